"""
The way out: everything between the proxy and the upstream API.

The HTTP client and its connection pool (C{client}); the egress proxy a
connection goes through, and the endpoint that gets there (C{egress}), with
the CONNECT and SOCKS5 handshakes (C{tunnel}); bodies moved both
ways with backpressure and an idle limit (C{relay}); strict, bounded
decoding of a compressed body the proxy must read (C{decoding}); server-held
keys that fail over, and when an answer makes a request try the next key
(C{failover}); the upstream's C{Connection} header, which Twisted's client
hides (C{hop}); the upstreams of C{UPSTREAMS_FILE} (C{channels}), the choice
between them by model (C{choose}) and their joined model list (C{models}).

May import: nothing else of the proxy's (Twisted and treq only), so that
every other part may use it.
"""
