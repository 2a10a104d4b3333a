"""
Who may pass, and what they may spend.

The bearer token and the proxy keys (C{auth}); named keys read from
C{KEYS_FILE} (C{named}); their limits, kept in the process or in Redis
(C{limits}, C{redisstore} over the RESP client C{resp}), among them the
quotas per day and month on the calendar of C{QUOTA_TZ} (C{quotas}); the tokens a
request asks for and a reply used (C{usage}, with C{formfield} for
multipart uploads); and what one request on a named key goes through, from
admission to the charge when it ends (C{accounting}).

May import: L{openai_proxy.http} (errors, SSE), L{openai_proxy.upstream}
(the pool of server-held keys), L{openai_proxy.telemetry}.  Never the
top-level path, moderation or ops.
"""
