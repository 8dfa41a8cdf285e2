"""Where mirrored sessions live: the protocols and key layout in ``base``, an in-process
backend in ``memory/`` and a Redis one (standalone, Sentinel, Cluster) in ``redis/``; the
session registry's protocol in ``registry``."""

from bridge.store.base import Keys, SessionStore

__all__ = ["Keys", "SessionStore"]
