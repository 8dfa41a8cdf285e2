"""The embedded backend: the Redis backend's semantics in one process, for running
without Redis (``store``), and its session registry (``registry``)."""
