"""Structured output: a grammar masks each step's logits to the tokens that keep the text
inside it, so the answer always parses. Grammars come from JSON schemas through llguidance
(a Rust engine with CPU wheels and a Hugging Face tokenizer adapter, also used by vLLM,
SGLang and llama.cpp)."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import torch

from infinikv.errors import InfinikvError


class GrammarError(InfinikvError, ValueError):
    """A schema that does not compile to a grammar."""


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text valid under `schema` (None: any JSON object)."""
    grammar = ""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema or {"type": "object"}))
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except Exception as e:  # noqa: BLE001 - whatever the compiler refuses is the schema's fault
        error = str(e)
    if error:
        raise GrammarError(f"the JSON schema does not compile to a grammar: {error}")
    return str(grammar)


class TokenGrammar:
    """A tokenizer's vocabulary as the grammar engine sees it, built once per model."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(llguidance.LLMatcher(self.tokenizer, grammar), self.vocab_size)


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        # Imported here: its TorchScript kernels warn at import, and most requests need none.
        import llguidance.torch as masks

        self.masks, self.matcher = masks, matcher
        self.bitmask = masks.allocate_token_bitmask(1, vocab_size)

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Set logits (1, V) of the tokens the grammar forbids next to -inf, in place."""
        self.masks.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        self.masks.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device))
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise InfinikvError(f"token {token} is outside the grammar: {self.matcher.get_error()}")
