"""
The front door and the HTTP vocabulary every part of the proxy speaks.

The site and its channel (C{server}) screen each request as soon as its head
is in: deadlines and size limits on the head, C{Host} and C{Authorization}
checks, the early key check, body limits, all answered before a resource
sees the request.  The rest is shared vocabulary: errors shaped like the
OpenAI API's own (C{errors}), server-sent events kept byte for byte
(C{sse}), which headers cross the proxy (C{headers}), and CORS (C{cors}).

May import: L{openai_proxy.telemetry}.  Never the key checks, the upstream
side, moderation or the top-level path: the early key check is handed in as
a callable, and what it grants is carried to the forwarder unread.
"""
