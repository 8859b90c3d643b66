"""Usage: the tap that reads token usage from response bytes, what providers report, the
estimate when they report nothing, prices, and deferred (background) work."""
