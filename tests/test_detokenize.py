"""Incremental detokenization and stop strings, on the default model's tokenizer."""

from __future__ import annotations

import torch

from infinikv.engine.detokenize import TextStream


def run(tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.flush())
    return deltas, stream


def test_deltas_concatenate_to_the_text(tokenizer) -> None:
    text = "Hello, world! Ünïcödé ✓ 日本語 and emoji 🚀 done."
    deltas, _ = run(tokenizer, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # split multi-byte chars are held back


def test_stop_string_spanning_tokens_cuts_output(tokenizer) -> None:
    deltas, stream = run(tokenizer, "The answer is 42.\n\nQuestion: next one", stop=("\n\nQuestion",))
    assert stream.stopped
    assert "".join(deltas) == "The answer is 42."


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tokenizer) -> None:
    deltas, stream = run(tokenizer, "a STO b STOP c", stop=("STOP",))
    assert stream.stopped and "".join(deltas) == "a STO b "


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    deltas, _ = run(tokenizer, "one two three four", stop=("four", "two"))
    assert "".join(deltas) == "one "


def test_long_streams_decode_as_the_whole(tokenizer) -> None:
    """Each push decodes a few tokens; what the deltas add up to is the whole sequence's
    decoding, over thousands of tokens of mixed scripts, digits, spaces and newlines, and for
    ids in an arbitrary order (byte tokens that form no character included)."""
    text = "Line 1:  spaced  out\n\tTabbed Ünïcödé 日本語 🚀 1234567 don't stop.\n" * 150
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    shuffled = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    for sequence in (ids, [ids[i] for i in shuffled] + ids[:20]):
        stream = TextStream(tokenizer)
        deltas = [stream.push(t) for t in sequence] + [stream.flush()]
        assert "".join(deltas) == tokenizer.decode(sequence, skip_special_tokens=True)
