"""The recall suite's cases (infinikv/evaluation/recall.py) over the real haystacks: lengths,
where the facts sit, what is asked, the splits kept apart, and the scoring."""

from __future__ import annotations

import re

import pytest

from infinikv.evaluation.haystack import HAYSTACKS, HaystackMissing, haystack_text
from infinikv.evaluation.recall import PHRASINGS, SPLITS, TASKS, RecallCase, recall_case


@pytest.fixture(scope="module", autouse=True)
def haystacks() -> None:
    try:
        for name in HAYSTACKS:
            haystack_text(name)
    except HaystackMissing as e:
        pytest.skip(str(e))


def test_haystacks_are_prose_without_markup() -> None:
    bible, debian = haystack_text("bible"), haystack_text("debian")
    assert bible.startswith("In the beginning God created the heaven and the earth.\n")
    assert "Ge1:1" not in bible and len(bible) > 4_000_000
    assert not re.search(r"</?(p|div|span|a|td|li|h\d)[ >]", debian)  # the text only, no tags
    assert "The system initialization" in debian and len(debian) > 400_000


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [2048, 8192])
def test_cases_have_the_length_and_their_facts_where_asked(tokenizer, task: str, length: int) -> None:
    cases = 4
    for index in range(cases):
        case = recall_case(tokenizer, task, length, "tune", index, cases)
        assert abs(len(case.prompt) - length) <= length // 100  # within 1%
        text = tokenizer.decode(case.prompt)
        for answer, depth in zip(case.answers, case.depths, strict=True):
            assert text.count(answer) == 1, (task, answer)
            # The fact sits at its depth of the prompt, within a line of text.
            assert abs(text.index(answer) / len(text) - depth) < 0.08, (task, index)
        if task == "chat":
            assert text.count("<|im_start|>user") >= length // 500
        else:
            assert case.answers[0] not in text[text.rindex("\n") :]  # the question names no value
        assert case.max_new_tokens >= 24


def test_depths_are_spread_and_cases_differ(tokenizer) -> None:
    cases = [recall_case(tokenizer, "single", 2048, "tune", i, 10) for i in range(10)]
    assert [round(c.depths[0], 2) for c in cases] == [round((i + 0.5) / 10, 2) for i in range(10)]
    assert len({c.answers for c in cases}) == 10
    assert {c.haystack for c in cases} == set(HAYSTACKS)
    # number, word and uuid values take turns
    assert cases[0].answers[0].isdigit() and cases[1].answers[0].isalpha() and len(cases[2].answers[0]) == 36


def test_multikey_asks_one_of_four_facts_of_the_same_shape(tokenizer) -> None:
    case = recall_case(tokenizer, "multikey", 4096, "tune", 3, 10)
    text = tokenizer.decode(case.prompt)
    question = text[text.rindex("\n") :]
    phrasing = next(p for p in PHRASINGS["tune"]["number"] if p.noun in question)
    stem = phrasing.fact.split("{key}")[0]
    assert text[: text.rindex("\n")].count(stem) == 4  # three distractors told the same way
    assert len(case.answers) == 1


def test_a_case_is_a_function_of_its_arguments(tokenizer) -> None:
    a = recall_case(tokenizer, "multiquery", 2048, "heldout", 5, 10)
    b = recall_case(tokenizer, "multiquery", 2048, "heldout", 5, 10)
    assert a == b
    assert a.prompt != recall_case(tokenizer, "multiquery", 2048, "tune", 5, 10).prompt


def test_the_splits_share_no_phrasing(tokenizer) -> None:
    tune = {p.fact for kind in PHRASINGS["tune"].values() for p in kind}
    heldout = {p.fact for kind in PHRASINGS["heldout"].values() for p in kind}
    assert not tune & heldout
    for task in TASKS:
        for split in SPLITS:
            other = "heldout" if split == "tune" else "tune"
            text = tokenizer.decode(recall_case(tokenizer, task, 2048, split, 0, 10).prompt)
            facts = [p.noun for kind in PHRASINGS[other].values() for p in kind]
            assert not any(f"the {noun} for" in text for noun in facts), (task, split)


def test_score_is_the_share_of_answers_found() -> None:
    case = RecallCase(
        "multivalue", 10, "tune", 0, "bible", [1], ("1234567", "Mango", "89"), (0.1, 0.5, 0.9), 8
    )
    assert case.score("1234567, mango and 89.") == 1.0
    assert case.score("The values are 1234567 and MANGO") == pytest.approx(2 / 3)
    assert case.score("nothing") == 0.0


def test_bad_arguments_are_named(tokenizer) -> None:
    with pytest.raises(ValueError, match="task 'needle'"):
        recall_case(tokenizer, "needle", 2048, "tune", 0, 10)
    with pytest.raises(ValueError, match="split 'test'"):
        recall_case(tokenizer, "single", 2048, "test", 0, 10)
    with pytest.raises(ValueError, match="outside 0..9"):
        recall_case(tokenizer, "single", 2048, "tune", 10, 10)
    with pytest.raises(ValueError, match="the debian haystack has"):
        recall_case(tokenizer, "single", 10**6, "tune", 1, 10)
