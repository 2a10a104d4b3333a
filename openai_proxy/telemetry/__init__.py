"""
What the proxy tells: Prometheus metrics (C{metrics}), logging set-up,
request ids and the redaction of secrets (C{logs}), and the access log's
one line per request (C{access}).

May import: nothing else of the proxy's; every other part may import it.
"""
