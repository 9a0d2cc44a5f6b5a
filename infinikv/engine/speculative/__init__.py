"""Speculative decoding: drafters propose tokens, the target verifies them in one forward.
Import from the submodules (drafter, lookup, self_draft, draft_model, verify, decoder)."""
