"""The response cache (``cache:``): answers stored by request, replayed.

- ``keys``: which requests are eligible (``cache.routes``, under any route
  prefix) and the key of one (route, namespace, canonical body).
- ``stores``: where entries live: an LRU in memory, or the shared Redis.
- ``replay``: entries are completions; a stream request gets one as SSE,
  and a streamed answer is stored as the completion it amounts to.
- ``ticket``: what the cache decided for one request, on its exchange.
- ``lookup``: ``ResponseCache``, the gate that looks up and answers hits,
  the observer that stores complete answers, and the hook that follows
  streamed ones.
"""
