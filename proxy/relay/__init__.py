"""The HTTP transport: read and peek the body, forward through upstream, stream back
(relay); CORS, Expect: 100-continue, and the models a request names (and the one check of
them against the key)."""
