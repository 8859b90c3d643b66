"""The response cache: opt-in per key, entries in memory or Redis, replayed byte for byte.

Offers `Cache` (lookup and the store sink), `Lookup`, the two stores (`MemoryStore`,
`RedisStore`, the latter imported where used: redis loads only with REDIS_URL) and
`replay`. `docs/cache.md` says what is cached and how.
"""
