"""The paged KV cache: a page pool shared by sequences, each sequence's block table, and the
page lists that attention reads (resident window, sinks, Self-Extend regions)."""
