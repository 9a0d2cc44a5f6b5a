"""A compact Llama-family decoder over a paged, pre-RoPE KV cache.

One forward runs a flat batch of N query tokens that may come from several sequences
(a prefill chunk of one, a decode token of another): the projections and the MLP run on
all N rows at once, attention runs per sequence over its own pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from infinikv.attention.interface import AttentionBackend, LongContextAttentionBackend
from infinikv.attention.memory_reads import LongContextState
from infinikv.attention.pytorch import paged_causal_attention, paged_long_context_attention
from infinikv.attention.tally import AttentionTally
from infinikv.cache.pages import LayerKV, PageList, PagePool
from infinikv.core.config import ModelConfig
from infinikv.core.rope import RotaryEmbedding
from infinikv.model.linear import (
    DecoderStack,
    DenseLinear,
    FewRowKernels,
    QuantizedLinear,
    dense,
    few_rows_limit,
)


@dataclass(frozen=True)
class SequenceSlice:
    """Rows [start, start + length) of a ForwardBatch belong to one sequence."""

    start: int
    length: int
    pages: PageList  # the sequence's block table
    kv_len: int  # resident tokens in the cache once this batch's keys are written
    long_context: LongContextState | None = None  # Self-Extend + memory; None: plain causal
    tally: AttentionTally | None = None  # set: its last row's attention is recorded (citations)


@dataclass(frozen=True)
class ForwardBatch:
    tokens: torch.Tensor  # (N,) long
    positions: torch.Tensor  # (N,) long, absolute positions
    slots: torch.Tensor  # (N,) long, cache slot (page * B + offset) of each token
    seqs: tuple[SequenceSlice, ...]
    logits_rows: torch.Tensor | None = None  # (S,) rows that need logits; None = all N


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, d = cfg.hidden_size, cfg.head_dim
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
        self.input_norm = nn.Parameter(torch.empty(D))
        # q, k, v projections fused into one matmul; q/k rows in interleaved RoPE order.
        self.qkv = DenseLinear(qkv, D, bias=cfg.qkv_bias)
        self.o = DenseLinear(D, cfg.num_heads * d, bias=cfg.o_bias)
        self.post_norm = nn.Parameter(torch.empty(D))
        # gate and up projections fused: rows [0, F) gate, [F, 2F) up.
        self.gate_up = DenseLinear(2 * cfg.intermediate_size, D)
        self.down = DenseLinear(D, cfg.intermediate_size)

    def stack_weights(self) -> tuple[torch.Tensor | None, ...]:
        """The layer's tensors in the order of the CPU decoder stack's layer table."""
        qkv, o = self.qkv, self.o
        return (
            *(self.input_norm, qkv.kernel_weight, qkv.bias, o.kernel_weight, o.bias),
            *(self.post_norm, self.gate_up.kernel_weight, self.down.kernel_weight),
        )

    def attention_input(self, x: torch.Tensor, eps: float, kernels: FewRowKernels | None) -> torch.Tensor:
        """q, k, v (N, (Hq + 2Hkv) d) of the layer's input x (N, D): projected after the norm."""
        if kernels is not None:
            return kernels.norm_project(x, self.input_norm, eps, self.qkv.kernel_weight, self.qkv.bias)
        return self.qkv(F.rms_norm(x, (x.shape[-1],), self.input_norm, eps))

    def finish(
        self, x: torch.Tensor, attn: torch.Tensor, eps: float, kernels: FewRowKernels | None
    ) -> torch.Tensor:
        """The layer's output: x (N, D) plus the projection of attention's output attn (N, Hq d),
        plus the MLP of that after the norm (with `kernels`, x itself is updated)."""
        if kernels is not None:
            o, gate_up, down = self.o, self.gate_up, self.down
            weights = (
                o.kernel_weight,
                o.bias,
                self.post_norm,
                eps,
                gate_up.kernel_weight,
                down.kernel_weight,
            )
            kernels.mlp_residual(x, attn.contiguous(), *weights)
            return x
        x = x + self.o(attn)
        h = F.rms_norm(x, (x.shape[-1],), self.post_norm, eps)
        gate, up = self.gate_up(h).chunk(2, dim=-1)  # (N, F) each
        return x + self.down(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        device: torch.device | str = "cpu",
        attention: AttentionBackend = paged_causal_attention,
        long_context_attention: LongContextAttentionBackend = paged_long_context_attention,
    ):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else DenseLinear(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, device=device)
        self.attention = attention
        self.long_context_attention = long_context_attention
        self.few_rows: FewRowKernels | None = None  # see `use_few_rows`
        self._layer_table: tuple | None = None  # the decoder stack's weights, made at first use
        self.rows_run = 0  # token rows through every forward so far (the engine budgets them)

    def use_few_rows(self, kernels: FewRowKernels | None) -> None:
        """Send inputs of few rows (decode steps, verifications) through `kernels`: the
        projections (quantized ones excepted) and the work around them (None: PyTorch
        operations and torch's matmul for every input)."""
        self.few_rows = kernels
        self._layer_table = None
        for module in self.modules():
            if isinstance(module, DenseLinear | QuantizedLinear):
                module.few_rows = None if kernels is None else kernels.linear

    def _kernel_rows(self) -> int:
        """Most rows the few-row kernels take for the layers' weights (dense or quantized
        projections, few_rows_limit by their format); 0 without the kernels."""
        qkv = cast(DecoderLayer, self.layers[0]).qkv
        if self.few_rows is None or not isinstance(qkv, DenseLinear | QuantizedLinear):
            return 0
        return few_rows_limit(qkv.kernel_weight.dtype)

    def _layer_kernels(self, rows: int) -> FewRowKernels | None:
        """The few-row kernels for a forward of `rows` rows, if they take its layers."""
        return self.few_rows if rows <= self._kernel_rows() else None

    @property
    def invariant_rows(self) -> int:
        """Most rows of one-token sequences a forward may hold with each row's logits equal
        to its logits alone: the few-row kernels' limit (their arithmetic is per row), else 1."""
        return max(1, self._kernel_rows())

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the rotary table (not a buffer) along with the weights."""
        super()._apply(fn, recurse)
        self._layer_table = None  # the weights may be new tensors
        if self.rope.inv_freq.device != self.device:
            self.rope = RotaryEmbedding(self.cfg.rope, self.cfg.head_dim, device=self.device)
        return self

    def load_state_dict(self, *args, **kwargs):
        self._layer_table = None  # assign=True puts new tensors in
        return super().load_state_dict(*args, **kwargs)

    def _stacked(self, batch: ForwardBatch, pool: PagePool, stack: DecoderStack) -> list[tuple] | None:
        """The batch's sequences as `stack` takes them (first row, rows, block table, resident
        slots), or None where one attends otherwise: another backend, a long-context step past
        its window or with a tally, more query rows than the kernel takes, a float32 or
        bfloat16 pool's absence; a query not at its sequence's end is left to the backend's own error."""
        cfg = self.cfg
        if (
            self.attention is not stack.attention
            or pool.k.dtype not in (torch.float32, torch.bfloat16)
            or pool.k.device.type != "cpu"
        ):
            return None
        seqs = []
        for s in batch.seqs:
            first = int(batch.positions[s.start])
            if s.long_context is not None and (
                s.tally is not None
                or self.long_context_attention is not stack.long_context_attention
                or first + s.length > s.long_context.self_extend.window
            ):
                return None
            if (
                s.length * cfg.num_heads // cfg.num_kv_heads > stack.max_query_rows
                or first != s.kv_len - s.length
            ):
                return None
            seqs.append((s.start, s.length, s.pages.ids, s.kv_len))
        return seqs

    def _run_stack(
        self,
        stack: DecoderStack,
        x: torch.Tensor,
        batch: ForwardBatch,
        pool: PagePool,
        seqs: list[tuple],
        layers: int,
    ) -> None:
        """The first `layers` decoder layers on x (N, D) in place, in one call of `stack`."""
        if self._layer_table is None:
            decoder = [cast(DecoderLayer, layer) for layer in self.layers]
            self._layer_table = stack.layer_table([layer.stack_weights() for layer in decoder])
        cfg = self.cfg
        own, grouped = pool.key_phases(batch.positions)
        separate = pool.k_group is not pool.k_rope
        stack.run(
            x,
            self._layer_table,
            layers,
            cfg.rms_norm_eps,
            (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
            torch.view_as_real(own),
            torch.view_as_real(grouped) if separate else None,
            (pool.k, pool.k_rope, pool.v, pool.k_group if separate else None),
            batch.slots,
            seqs,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def new_page_pool(
        self,
        max_tokens: int,
        page_size: int,
        fill_value: float | None = None,
        group: int = 1,
        dtype: torch.dtype | None = None,
    ) -> PagePool:
        """A pool for this model's keys and values, kept in `dtype` (None: the model's);
        `group`: the Self-Extend group size of the long-context sequences it will hold (1 for
        plain attention)."""
        cfg = self.cfg
        return PagePool.for_tokens(
            max_tokens,
            page_size,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=dtype or self.dtype,
            device=self.device,
            fill_value=fill_value,
            group=group,
            rope=self.rope,
        )

    def _attend(
        self, layer: int, q: torch.Tensor, positions: torch.Tensor, kv: LayerKV, s: SequenceSlice
    ) -> torch.Tensor:
        rows = slice(s.start, s.start + s.length)
        if s.long_context is None:
            return self.attention(q[rows], positions[rows], kv, s.pages, s.kv_len, self.rope)
        if s.tally is not None:
            last = s.start + s.length - 1
            s.tally.observe(
                layer,
                q[last : last + 1],
                int(positions[last]),
                kv,
                s.pages,
                s.kv_len,
                self.rope,
                s.long_context,
            )
        return self.long_context_attention(
            q[rows], positions[rows], kv, s.pages, s.kv_len, layer, self.rope, s.long_context
        )

    def _run_layers(
        self, x: torch.Tensor, batch: ForwardBatch, pool: PagePool, kernels: FewRowKernels | None, layers: int
    ) -> torch.Tensor:
        """The first `layers` decoder layers on x (N, D), one at a time: (N, D)."""
        cfg = self.cfg
        N, Hq, Hkv, d, eps = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        phases = pool.key_phases(batch.positions)  # shared by all layers
        for i, module in enumerate(self.layers[:layers]):
            layer = cast(DecoderLayer, module)
            qkv = layer.attention_input(x, eps, kernels)  # (N, (Hq + 2Hkv) d)
            q, k, v = qkv.split([Hq * d, Hkv * d, Hkv * d], dim=-1)
            pool.write_keys(i, batch.slots, k.view(N, Hkv, d), v.view(N, Hkv, d), phases)
            kv = pool.layer(i)
            q = q.view(N, Hq, d)
            outs = [self._attend(i, q, batch.positions, kv, s) for s in batch.seqs]  # each (n_s, Hq, d)
            attn = outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, Hq, d)
            x = layer.finish(x, attn.reshape(N, Hq * d), eps, kernels)  # (N, D)
        return x

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: PagePool, num_layers: int | None = None) -> torch.Tensor:
        """Write the batch's keys/values into `pool` and return float32 logits (S, V).

        With `num_layers`, only the first layers run, then the final norm and head: the
        self-draft (it writes those layers' keys/values only)."""
        cfg = self.cfg
        D, eps, layers = cfg.hidden_size, cfg.rms_norm_eps, num_layers or cfg.num_layers
        x = F.embedding(batch.tokens, self.embed)  # (N, D)
        self.rows_run += batch.tokens.shape[0]
        kernels = self._layer_kernels(batch.tokens.shape[0])
        stack = None if kernels is None else kernels.stack
        seqs = None if stack is None else self._stacked(batch, pool, stack)
        if stack is not None and seqs is not None:
            self._run_stack(stack, x, batch, pool, seqs, layers)
        else:
            x = self._run_layers(x, batch, pool, kernels, layers)
        if batch.logits_rows is not None:
            x = x[batch.logits_rows]  # (S, D)
        x = F.rms_norm(x, (D,), self.norm, eps)
        if self.lm_head is None:
            logits = dense(x, self.embed, few_rows=None if self.few_rows is None else self.few_rows.linear)
        else:
            logits = self.lm_head(x)
        return logits.float()  # (S, V)
