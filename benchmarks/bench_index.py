"""Memory index kinds on SmolLM2-135M's own keys: recall of the exact top-k and search time.

    python benchmarks/bench_index.py

The keys are the default model's pre-RoPE keys of a 12k-token passkey prompt (4 layers, 3
kv-heads; all but the last 1,000 positions go in the index); the queries are the last 500
positions' query heads rotated by the default memory distance (1536), as the memory
searches them. flat is exact; ivf trains its lists at 9,984 keys; hnsw is a graph. Writes
benchmarks/results/index.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from infinikv.memory.index import INDEX_KINDS, MemoryIndex

LAYERS = [2, 10, 18, 26]
TOKENS, QUERIES, TOP_K, DISTANCE = 12000, 500, 32, 1536


def model_keys_and_queries() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> keys (n, Hkv, d) before RoPE, queries (Hkv, QUERIES * g, d) at the distance."""
    from bench_long_context import _model_dir, _tokenizer
    from transformers import AutoModelForCausalLM

    from infinikv.evaluation.passkey import passkey_case
    from infinikv.service.settings import Settings

    settings = Settings()
    case = passkey_case(_tokenizer(settings), TOKENS, 0.5, seed=0)
    model = AutoModelForCausalLM.from_pretrained(_model_dir(settings), dtype=torch.float32).eval()
    cfg = model.config
    d, hq, hkv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads, cfg.num_key_value_heads
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}  # projection outputs per chunk
    for layer in LAYERS:
        attn = model.model.layers[layer].self_attn
        for name, proj in (("k", attn.k_proj), ("q", attn.q_proj)):
            keep = seen.setdefault((name, layer), [])
            proj.register_forward_hook(lambda m, i, o, keep=keep: keep.append(o[0]))
    ids = torch.tensor([case.prompt])
    with torch.no_grad():  # the projections are all that is read; chunks keep attention cheap
        for start in range(0, ids.shape[1], 2048):
            model(ids[:, start : start + 2048])
    probe = torch.zeros(1, 1, d)
    cos, sin = (t[0, 0] for t in model.model.rotary_emb(probe, torch.tensor([[DISTANCE]])))
    out = {}
    for layer in LAYERS:
        k = torch.cat(seen[("k", layer)]).view(-1, hkv, d)
        q = torch.cat(seen[("q", layer)])[-QUERIES:].view(QUERIES, hq, d)
        q = q * cos + torch.cat([-q[..., d // 2 :], q[..., : d // 2]], -1) * sin  # HF's half-split RoPE
        q = q.view(QUERIES, hkv, hq // hkv, d).transpose(0, 1).reshape(hkv, -1, d)
        out[layer] = (k[: -QUERIES - 500], q)
    return out


def main() -> None:
    data = model_keys_and_queries()
    rows = []
    for kind in INDEX_KINDS:
        recalls, add_s, search_ms = [], 0.0, 0.0
        for keys, queries in data.values():
            index = MemoryIndex(1, keys.shape[1], keys.shape[2], kind)
            t0 = time.perf_counter()
            index.add(0, keys, torch.arange(len(keys)))
            add_s += time.perf_counter() - t0
            index.search(0, queries[:, :9], TOP_K)  # warm-up
            t0 = time.perf_counter()
            for step in range(0, queries.shape[1], 9):  # decode-sized searches: one position's heads
                _, got = index.search(0, queries[:, step : step + 9], TOP_K)
            search_ms += (time.perf_counter() - t0) * 1000 / (queries.shape[1] // 9)
            _, got = index.search(0, queries, TOP_K)
            want = torch.einsum("hqd,mhd->hqm", queries, keys).topk(TOP_K, dim=-1).indices
            pairs = zip(got.flatten(0, 1), want.flatten(0, 1), strict=True)
            recalls.append(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in pairs) / want.numel())
        rows.append(
            {
                "index": kind,
                "keys_per_head": len(next(iter(data.values()))[0]),
                "recall_at_32": [round(r, 3) for r in recalls],
                "build_s": add_s / len(data),
                "search_ms_per_position": search_ms / len(data),
            }
        )
        r = rows[-1]
        print(
            f"{kind:>5}: recall@{TOP_K} {min(recalls):.3f}-{max(recalls):.3f}  "
            f"build {r['build_s']:.2f} s/layer  "
            f"search {r['search_ms_per_position']:.2f} ms per position and layer",
            flush=True,
        )
    out = Path(__file__).resolve().parent / "results" / "index.json"
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
