"""The Redis backend: ``url`` reads ``BRIDGE_REDIS_URL``, ``connection`` builds the client
for a standalone server, Sentinel or Cluster, ``scripts`` holds the store's Lua, ``store``
and ``registry`` run it, and ``calls`` turns a Redis error into ``StoreUnavailable``."""
