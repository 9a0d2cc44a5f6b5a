"""Decoding: sampling, detokenization with stop strings, sequences, the generation loop, and the
worker that serves requests. Import from the submodules (this package imports nothing)."""
