"""The Llama-family decoder: config, rotary embedding, projections, forward pass, weight
loading. Import from the submodules (`infinikv.model.llama`, `infinikv.model.loader`, ...);
this package imports nothing itself, so `attention` can use `model.rope` without a cycle."""
