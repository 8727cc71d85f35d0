"""`vlmkit serve`: the HTTP API, the web page, batching, limits and metrics."""
