"""Recall tasks over real text, after RULER (NVIDIA's long-context benchmark): facts planted
at chosen depths of a window of a real book, asked for at the end. (Over 350 lines: the five
tasks share their case's window, phrasings and depths; most of the length is their texts.)

Tasks (RULER's names in brackets):

    single      one fact; its value a number, a word or a uuid (niah_single_1..3)
    multikey    the fact and three distractors of the same shape for other keys (niah_multikey_1)
    multivalue  four values of one key, all asked for (niah_multivalue)
    multiquery  four facts of four keys, all asked for (niah_multiquery)
    chat        a fact told in a many-turn conversation whose other turns are passages of
                the book, asked for in the last turn through the chat template

A case is a function of (task, length, split, index): the split's seeds choose the
haystack (the two books alternate), the window into it, the keys, the values, the
phrasing and the depths. The two splits have disjoint seeds and disjoint phrasings, so a
default tuned on one is judged on text, phrasing, keys and depths it never saw.
"""

from __future__ import annotations

import bisect
import itertools
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infinikv.evaluation.haystack import HAYSTACKS, haystack_text

TASKS = ("single", "multikey", "multivalue", "multiquery", "chat")
SPLITS = ("tune", "heldout")
# Seeds of case i: 1000 * split + i (split 0: tuning, 1: held-out).
SPLIT_SEED = {"tune": 0, "heldout": 1000}
VALUE_KINDS = ("number", "word", "uuid")
NEEDLES_PER_CASE = 4  # multikey (1 asked + 3 distractors), multivalue, multiquery: RULER's 4
# Answer lengths in tokens: a uuid is ~30 of SmolLM2's tokens, four 7-digit numbers ~40.
MAX_NEW_TOKENS = {"single": 48, "multikey": 24, "multivalue": 64, "multiquery": 64, "chat": 32}

# Keys: two words, as RULER's (its wonderwords adjective-noun pairs).
ADJECTIVES = (
    "amber ancient bitter bold brave bright broken calm clever cold copper crimson curious "
    "dark distant dusty eager early faint fierce gentle giant golden grey hidden hollow humble "
    "icy idle iron jolly keen lively lonely loud lucky marble mellow misty modest narrow noble "
    "odd pale patient plain polite proud quiet rapid rare restless round rusty sandy scarlet "
    "secret shy silent silver slow smooth solemn sour spare steady stormy sturdy sudden swift "
    "tall tame tender tidy tiny velvet violet vivid wandering warm wild windy wise wooden young"
).split()
NOUNS = (
    "anchor apron arrow badger banner barrel beacon bell blossom boulder bridge bucket cactus "
    "canoe castle cedar chimney clock comet compass cottage crane crystal dagger dolphin dragon "
    "falcon feather fiddle forest fountain garden glacier goblet harbor harp helmet heron island "
    "jacket kettle ladder lantern lemon lighthouse lizard meadow mirror monkey mountain needle "
    "otter owl paddle parrot pebble pepper piano pigeon pillow planet puzzle quill rabbit river "
    "saddle sailor scarf shovel spider squirrel stable statue tiger tower trumpet tulip turtle "
    "umbrella valley violin walrus wagon whistle window wizard"
).split()
# Word values: things with no meaning next to the keys.
WORDS = (
    "apricot avalanche biscuit blizzard buttercup caramel carnival cinnamon cobalt coconut "
    "cucumber daffodil dynamo eclipse emerald espresso flamingo galaxy gazebo ginger granite "
    "hammock horizon jasmine juniper kaleidoscope lagoon lavender macaroni magnolia mango "
    "marathon mosaic nectar nutmeg origami orchestra paprika pelican peppermint pistachio "
    "porcelain pretzel quartz raspberry saffron sapphire sardine snorkel sombrero tangerine "
    "telescope thunder toboggan trombone tundra vanilla volcano waffle yogurt zeppelin"
).split()


@dataclass(frozen=True)
class Phrasing:
    """How a fact is told and asked for. `fact` tells "the {noun} for {key} is {value}" in
    its own words (the answer starts as that clause does, so the model can complete it);
    `one_of` tells one of several values of a key (multivalue)."""

    noun: str  # what a value is called, e.g. "access code"
    fact: str  # with {key} and {value}
    one_of: str  # with {key} and {value}

    def question(self, key: str) -> str:
        return f"What is the {self.noun} for {key}?"

    def answer(self, key: str) -> str:
        return f"The {self.noun} for {key} is"

    def plural_question(self, keys: str) -> str:
        return f"What are all the {self.noun}s for {keys}?"

    def plural_answer(self, keys: str) -> str:
        return f"The {self.noun}s for {keys} are"


def _phrasing(noun: str, fact: str, one_of: str) -> Phrasing:
    return Phrasing(noun, fact.replace("NOUN", noun), one_of.replace("NOUN", noun))


# Per split and value kind; the held-out split's wordings are never seen while tuning.
PHRASINGS: dict[str, dict[str, list[Phrasing]]] = {
    "tune": {
        "number": [
            _phrasing(
                "special magic number",
                "The NOUN for {key} is {value}.",
                "One of the NOUNs for {key} is {value}.",
            ),
            _phrasing(
                "access code",
                "Remember that the NOUN for {key} is {value}.",
                "Among the NOUNs for {key} is {value}.",
            ),
        ],
        "word": [
            _phrasing(
                "special magic word",
                "The NOUN for {key} is {value}.",
                "One of the NOUNs for {key} is {value}.",
            ),
            _phrasing(
                "password", "Note it down: the NOUN for {key} is {value}.", "One NOUN for {key} is {value}."
            ),
        ],
        "uuid": [
            _phrasing(
                "special magic uuid",
                "The NOUN for {key} is {value}.",
                "One of the NOUNs for {key} is {value}.",
            ),
            _phrasing(
                "serial identifier",
                "Keep this safe: the NOUN for {key} is {value}.",
                "One NOUN for {key} is {value}.",
            ),
        ],
    },
    "heldout": {
        "number": [
            _phrasing(
                "secret number",
                "Listen carefully: the NOUN for {key} is {value}.",
                "Another of the NOUNs for {key} is {value}.",
            ),
            _phrasing(
                "registration number",
                "For the record, the NOUN for {key} is {value}.",
                "{key} has several NOUNs, and one of them is {value}.",
            ),
        ],
        "word": [
            _phrasing(
                "code word",
                "Do not forget that the NOUN for {key} is {value}.",
                "A NOUN for {key} is {value}.",
            ),
            _phrasing(
                "secret word",
                "Written on a card: the NOUN for {key} is {value}.",
                "One of the NOUNs for {key} is {value}.",
            ),
        ],
        "uuid": [
            _phrasing(
                "tracking id",
                "The NOUN for {key} is {value}; it matters later.",
                "One of the NOUNs for {key} is {value}.",
            ),
            _phrasing(
                "license key",
                "Here it is: the NOUN for {key} is {value}.",
                "A NOUN for {key} is {value}.",
            ),
        ],
    },
}
INTRO = (
    "Some special facts are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about them afterwards.\n"
)

# The chat task's turns around the passages.
CHAT_FACTS = {
    "tune": [
        ("locker combination", "By the way, my locker combination at the gym is {value}."),
        ("flight number", "Before we start: my flight next week is number {value}."),
    ],
    "heldout": [
        ("membership number", "Quick note, my library membership number is {value}."),
        ("parcel code", "Also, the code to pick up my parcel is {value}."),
    ],
}
CHAT_ASKS = ["Here is a passage I am reading:", "Another passage:", "What do you make of this one?"]
CHAT_REPLIES = [
    "Thank you for sharing this passage.",
    "Noted. It is an interesting passage.",
    "I have read it. Please go on.",
]
CHAT_PASSAGE_TOKENS = 400  # about a page: a conversation of N tokens has N // 400 turns


@dataclass(frozen=True)
class RecallCase:
    """One prompt of a recall task, what its answer must contain, and where the facts sit."""

    task: str
    length: int  # the length asked for; the prompt is within a few tokens of it
    split: str
    index: int
    haystack: str
    prompt: list[int]
    answers: tuple[str, ...]  # every one must appear in the generated text
    depths: tuple[float, ...]  # of the facts asked for, 0 = start of the text, 1 = its end
    max_new_tokens: int

    def answer_tokens(self, tokenizer: Any) -> list[tuple[int, int]]:
        """Each answer's first planted occurrence as a token span [start, end) of the prompt."""
        text = tokenizer.decode(self.prompt)
        offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        spans = []
        for answer in self.answers:
            at = text.index(answer)
            inside = [i for i, (a, b) in enumerate(offsets) if a < at + len(answer) and b > at]
            spans.append((inside[0], inside[-1] + 1))
        return spans

    def score(self, generated: str) -> float:
        """RULER's string_match_all: the share of the answers found in the generated text."""
        text = generated.lower()
        return sum(a.lower() in text for a in self.answers) / len(self.answers)


def recall_case(tokenizer: Any, task: str, length: int, split: str, index: int, cases: int) -> RecallCase:
    """Case `index` of `cases` of `task` at about `length` prompt tokens in `split`; the depth
    of the fact asked for is spread evenly over the cases ((index + 0.5) / cases)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if not 0 <= index < cases:
        raise ValueError(f"case index {index} is outside 0..{cases - 1}")
    seed = SPLIT_SEED[split] + index
    rng = random.Random(f"{task}:{length}:{seed}")
    haystack = HAYSTACKS[seed % len(HAYSTACKS)]
    depth = (index + 0.5) / cases
    build: Callable[..., RecallCase] = _chat_case if task == "chat" else _needle_case
    return build(tokenizer, task, length, split, index, haystack, depth, rng)


def _needle_case(
    tokenizer: Any,
    task: str,
    length: int,
    split: str,
    index: int,
    haystack: str,
    depth: float,
    rng: random.Random,
) -> RecallCase:
    kind = VALUE_KINDS[index % len(VALUE_KINDS)] if task == "single" else "number"
    phrasing = rng.choice(PHRASINGS[split][kind])
    n = 1 if task == "single" else NEEDLES_PER_CASE
    keys = _distinct(rng, n, lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}")
    values = _distinct(rng, n, lambda: _value(rng, kind))
    if task == "multivalue":
        keys = [keys[0]] * n
    # The facts asked for: multikey asks for the first key only (the others distract).
    asked = 1 if task in ("single", "multikey") else n
    depths = [depth] + [rng.random() for _ in range(n - 1)]
    template = phrasing.one_of if task == "multivalue" else phrasing.fact
    facts = [template.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
    if asked == 1:
        tail = f"\n{phrasing.question(keys[0])} {phrasing.answer(keys[0])}"
    else:
        named = " and ".join(dict.fromkeys(keys))  # multivalue: the one key
        tail = f"\n{phrasing.plural_question(named)} {phrasing.plural_answer(named)}"
    budget = length - _count(tokenizer, INTRO + tail) - sum(_count(tokenizer, " " + f) for f in facts)
    lines = _window_lines(tokenizer, haystack, budget, rng)
    text = _plant(lines, list(zip(depths, facts, strict=True)))
    prompt = tokenizer(INTRO + text + tail, add_special_tokens=False)["input_ids"]
    return RecallCase(
        task,
        length,
        split,
        index,
        haystack,
        prompt,
        tuple(values[:asked]),
        tuple(depths[:asked]),
        MAX_NEW_TOKENS[task],
    )


def _chat_case(
    tokenizer: Any,
    task: str,
    length: int,
    split: str,
    index: int,
    haystack: str,
    depth: float,
    rng: random.Random,
) -> RecallCase:
    thing, fact = rng.choice(CHAT_FACTS[split])
    value = _value(rng, "number")
    question = f"What is my {thing}? Please answer with just the number."
    answer = f"Your {thing} is"
    turns = max(2, length // CHAT_PASSAGE_TOKENS)
    told = min(turns - 1, int(depth * turns))
    asks = [rng.choice(CHAT_ASKS) for _ in range(turns)]
    replies = [rng.choice(CHAT_REPLIES) for _ in range(turns)]
    window = _window(tokenizer, haystack, length, rng)

    def render(per_turn: int) -> list[int]:
        messages: list[dict[str, str]] = []
        for t in range(turns):
            passage = tokenizer.decode(window[t * per_turn : (t + 1) * per_turn]).strip()
            content = f"{asks[t]}\n{passage}"
            if t == told:
                content = f"{fact.format(value=value)}\n{content}"
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": replies[t]}]
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text + answer, add_special_tokens=False)["input_ids"]

    # The turns' markup is measured once with empty passages; the passages fill the rest.
    markup = len(render(0))
    prompt = render(max(1, (length - markup) // turns))
    return RecallCase(
        task,
        length,
        split,
        index,
        haystack,
        prompt,
        (value,),
        (told / turns,),  # the fact opens its turn
        MAX_NEW_TOKENS[task],
    )


def _value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))  # RULER's 7-digit numbers
    if kind == "word":
        return rng.choice(WORDS)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(rng: random.Random, n: int, draw: Callable[[], str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        value = draw()
        if value not in out:
            out.append(value)
    return out


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


_TOKENS: dict[tuple[int, str], list[int]] = {}


def _haystack_tokens(tokenizer: Any, name: str) -> list[int]:
    """The haystack's tokens, once per tokenizer and process (the Bible takes ~5 s)."""
    key = (id(tokenizer), name)
    if key not in _TOKENS:
        _TOKENS[key] = tokenizer(haystack_text(name), add_special_tokens=False)["input_ids"]
    return _TOKENS[key]


def _window(tokenizer: Any, name: str, tokens: int, rng: random.Random) -> list[int]:
    """`tokens` tokens of haystack `name` from a random offset."""
    ids = _haystack_tokens(tokenizer, name)
    if tokens > len(ids):
        raise ValueError(f"the {name} haystack has {len(ids)} tokens, {tokens} were asked for")
    start = rng.randrange(len(ids) - tokens + 1)
    return ids[start : start + tokens]


def _window_lines(tokenizer: Any, name: str, tokens: int, rng: random.Random) -> list[str]:
    """`tokens` tokens of haystack `name` from a random offset, as lines (the first and the
    last may be cut)."""
    return tokenizer.decode(_window(tokenizer, name, tokens, rng)).split("\n")


def _plant(lines: list[str], facts: list[tuple[float, str]]) -> str:
    """The lines with each fact appended to the line where its depth of the text's characters
    falls (between sentences)."""
    ends = list(itertools.accumulate(len(line) + 1 for line in lines))
    out = list(lines)
    for depth, fact in facts:
        at = min(len(out) - 1, bisect.bisect_left(ends, depth * ends[-1]))
        out[at] = f"{out[at]} {fact}"
    return "\n".join(out)
