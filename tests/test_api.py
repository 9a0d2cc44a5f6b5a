"""The Python API (`infinikv.LLM`) on the default model and settings: generate, stream and
chat, JSON under a schema; bad parameters refused by name; calls from several threads batched with outputs as
when made one by one; sessions that keep a document, are found again by id and deleted."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from infinikv import LLM, InfinikvError
from infinikv.documents import read_path

from .books import epub_book, genesis, pdf_book

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    with LLM() as made:
        yield made


def test_generate_stream_and_chat(llm) -> None:
    out = llm.generate("The capital of France is", max_tokens=8)
    assert "Paris" in out.text and 0 < out.completion_tokens <= 8 and out.prompt_tokens > 0
    assert "".join(llm.stream("The capital of France is", max_tokens=8)) == out.text
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=24)
    assert "Paris" in reply.text
    assert "".join(llm.stream_chat([{"role": "user", "content": "Say hi."}], max_tokens=4, stop="\n"))
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}},
        "required": ["name"],
        "additionalProperties": False,
    }
    person = llm.chat([{"role": "user", "content": "Name a person."}], max_tokens=32, json_schema=schema)
    assert set(json.loads(person.text)) == {"name"}
    with pytest.raises(ValueError, match="top_p"):
        llm.generate("hi", top_p=2)
    with pytest.raises(TypeError, match="bogus"):
        llm.generate("hi", bogus=1)
    with pytest.raises(InfinikvError, match="empty prompt"):
        llm.generate("")


def test_calls_from_threads_run_together_and_answer_as_alone(llm) -> None:
    prompts = ["The sea was calm and", "In the year 1850, the", "Bread is made from", "Winter came early:"]
    alone = [llm.generate(p, max_tokens=16, ignore_eos=True).text for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: llm.generate(p, max_tokens=16, ignore_eos=True).text, prompts))
    assert together == alone


def test_a_session_keeps_its_document_and_turns_until_deleted(llm) -> None:
    session = llm.session()
    document = "Field notes. The keeper of the north light is named Tobias Marlowe. " * 3
    tokens = session.add_document(document, name="notes.txt")
    assert tokens > 0
    answer = session.complete("\nQuestion: What is the name of the keeper? Answer:", max_tokens=24)
    assert "Tobias" in answer.text or "Marlowe" in answer.text, answer.text
    session.chat("Thank you.", max_tokens=8)
    stats = llm.session(session.id).stats()  # found again by its id
    assert [d.name for d in stats.documents] == ["notes.txt"] and stats.turns == 1
    assert stats.tokens > tokens
    session.delete()
    with pytest.raises(InfinikvError, match="not found"):
        llm.session(session.id)


def test_a_session_reads_an_epub_and_a_pdf_with_their_chapters_and_pages(llm, tmp_path) -> None:
    chapters = genesis(3)
    fact = "The keeper of the north light is named Tobias Marlowe."
    planted = [chapters[0], [*chapters[1][:10], fact, *chapters[1][10:]], chapters[2]]
    (tmp_path / "genesis.epub").write_bytes(epub_book(chapters))
    (tmp_path / "genesis.pdf").write_bytes(pdf_book(planted))
    session = llm.session()
    for name in ("genesis.epub", "genesis.pdf"):
        document = read_path(tmp_path / name)
        session.add_file(tmp_path / name)
        span = session.stats().documents[-1]
        assert span.name == name and [s.title for s in span.sections] == [s.title for s in document.sections]
        history = llm._engine.call_blocking(lambda e: list(e.sessions.get(session.id, "").seq.tokens))
        tokenizer = llm._engine.generator.tokenizer
        for section in span.sections:  # each section's tokens are exactly its characters
            assert span.start <= section.start < section.end <= span.end
            text = tokenizer.decode(history[section.start : section.end])
            assert text.strip() == document.text[section.char_start : section.char_end].strip()
    question = "\n\nQuestion: What is the name of the keeper of the north light?\nAnswer: The keeper"
    question += " of the north light is named"
    answer = session.complete(question, max_tokens=8, citations=True)
    assert "Tobias Marlowe" in answer.text, answer.text
    top = answer.citations[0]  # the passage it copied from
    assert fact in top.text and top.name == "genesis.pdf" and top.section.startswith("page: page "), top
    session.delete()


def test_a_session_on_redis_outlives_the_llm_that_made_it(redis_url) -> None:
    with LLM(redis_url=redis_url) as first:
        session = first.session()
        session.chat("My name is Ada.", max_tokens=8)
        tokens = session.stats().tokens
    with LLM(redis_url=redis_url) as second:
        again = second.session(session.id)
        assert again.stats().tokens == tokens and again.stats().turns == 1
        again.delete()
