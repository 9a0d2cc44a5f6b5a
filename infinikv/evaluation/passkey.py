"""Passkey retrieval (LongLM / Landmark-attention style): a 5-digit key hidden at some depth
in repetitive filler text, asked for at the end with a plain completion prompt."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyCase:
    prompt: list[int]
    key: str
    depth: float  # where the key sits, 0 = start of the filler, 1 = end


def passkey_case(tokenizer: Any, length: int, depth: float, seed: int) -> PasskeyCase:
    """A prompt of about `length` tokens with a 5-digit key at `depth` of the filler."""
    text, key = passkey_document(tokenizer, length, depth, seed)
    return PasskeyCase(tokenizer(text + QUESTION, add_special_tokens=False)["input_ids"], key, depth)


def passkey_document(tokenizer: Any, length: int, depth: float, seed: int) -> tuple[str, str]:
    """(text, key): about `length` tokens, question included, with the key at `depth`; the
    text stops before the question (QUESTION), which a caller asks separately."""
    key = str(random.Random(seed).randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler = enc(FILLER)
    budget = length - len(enc(INTRO)) - len(enc(needle)) - len(enc(QUESTION))
    repeats = max(1, budget // len(filler))
    before = round(repeats * depth)
    return INTRO + FILLER * before + needle + FILLER * (repeats - before), key


def found(key: str, answer: str) -> bool:
    """The first number in the answer is the key."""
    match = re.search(r"\d+", answer)
    return match is not None and match.group() == key
