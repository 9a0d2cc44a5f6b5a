"""The external memory of evicted KV blocks: the kNN index and key sketch that search them,
the RAM tier and the block store that hold their payloads (tiers 2 and 3 in docs/architecture.md)."""
