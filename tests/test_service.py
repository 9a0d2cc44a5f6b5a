"""The HTTP service as users meet it: a real `infinikv serve` process on loopback with the real
default model and a real redis-server, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import time

import openai
import pytest
import requests
import torch

from infinikv.engine.session import session_prefix
from infinikv.evaluation.haystack import haystack_text
from infinikv.evaluation.passkey import QUESTION, found, passkey_document

from .books import epub_book, genesis, pdf_book
from .server_process import infinikv_server

pytestmark = [pytest.mark.slow, pytest.mark.redis]

KEY_A, KEY_B = "key-a-secret", "key-b-secret"
# A small resident window, so ingested documents and long conversations go through memory.
LONG_CONTEXT = ["--resident", "512", "--window", "128"]
LIMITS = ["--max-tokens-limit", "64", "--max-body-bytes", "1000000", "--slots", "3"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_url):
    # Lookup drafting on: lossless, so every answer below is what plain decoding gives.
    args = [
        *LONG_CONTEXT,
        *LIMITS,
        "--redis-url",
        redis_url,
        "--api-keys",
        f"{KEY_A},{KEY_B}",
        "--draft",
        "lookup",
    ]
    with infinikv_server(tmp_path_factory.mktemp("server"), *args) as base:
        yield base


def client(base: str, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_session(base: str, key: str = KEY_A) -> str:
    r = requests.post(f"{base}/v1/sessions", headers=auth(key), timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def ingest(base: str, session: str, text: str, key: str = KEY_A, as_file: bool = True) -> dict:
    """Upload a document (a .txt file, or JSON text) and wait (bounded) for its ingestion job."""
    if as_file:
        return ingest_file(base, session, "book.txt", text.encode(), key)
    url = f"{base}/v1/sessions/{session}/documents"
    return finished_job(
        base, requests.post(url, headers=auth(key), json={"text": text, "name": "notes"}, timeout=30), key
    )


def ingest_file(base: str, session: str, name: str, data: bytes, key: str = KEY_A) -> dict:
    url = f"{base}/v1/sessions/{session}/documents"
    return finished_job(
        base, requests.post(url, headers=auth(key), files={"file": (name, data)}, timeout=30), key
    )


def finished_job(base: str, r: requests.Response, key: str) -> dict:
    assert r.status_code == 202, r.text
    job = r.json()
    for _ in range(600):
        job = requests.get(f"{base}/v1/jobs/{job['id']}", headers=auth(key), timeout=30).json()
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    return job


def ask_passkey(base: str, session: str, key: str = KEY_A) -> str:
    out = client(base, key).completions.create(
        model="SmolLM2-135M-Instruct",
        prompt=QUESTION,
        max_tokens=8,
        temperature=0,
        extra_body={"session_id": session},
    )
    return out.choices[0].text


def test_openai_client_chat_and_completions_stream_and_not(server) -> None:
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["SmolLM2-135M-Instruct"]
    chat = c.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.completion_tokens <= 16 and chat.usage.prompt_tokens > 5

    chunks = list(
        c.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == chat.choices[0].message.content  # greedy: same text, streamed or not
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chat.usage.total_tokens
    # The same prompt again: its keys came from the prefix cache, but for its last page's.
    again = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert 0 < again < chat.usage.prompt_tokens and again >= chat.usage.prompt_tokens_details.cached_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == chat.choices[0].finish_reason

    capital = dict(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=4)
    text = c.completions.create(**capital, temperature=0, stop=["."])
    assert text.choices[0].text.strip().startswith("Paris") and "." not in text.choices[0].text
    assert text.choices[0].finish_reason == "stop"
    pieces = c.completions.create(**capital, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces).strip().startswith("Paris")


def step_rows(base: str) -> float:
    """The engine's token rows so far, from /metrics (the step-rows histogram's sum)."""
    text = requests.get(f"{base}/metrics", headers=auth(), timeout=30).text
    return float(re.search(r"^infinikv_engine_step_tokens_sum (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server) -> None:
    url = f"{server}/v1/chat/completions"
    ok_body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    as_json = {**auth(), "content-type": "application/json"}
    cases = [
        (dict(data=b"{not json", headers=as_json), 400, "not valid JSON"),
        (dict(json={"messages": "hi"}), 400, "messages"),
        (dict(json={**ok_body, "temperature": "hot"}), 400, "temperature"),
        (dict(json={**ok_body, "max_tokens": 10_000}), 400, "exceeds this server's limit of 64"),
        (dict(json={**ok_body, "n": 17}), 400, "n"),
        (dict(json={**ok_body, "model": "gpt-9"}), 404, "not served here"),
        (dict(json={**ok_body, "session_id": "sess_nope"}), 404, "not found"),
        (dict(data=b"x" * 2_000_000, headers=as_json), 413, "limit"),
        (
            dict(data=b'{"messages": [{"role": "user", "content": "\\ud800"}]}', headers=as_json),
            400,
            "surrogate",
        ),
        (dict(json={**ok_body, "seed": 2**70}), 400, "seed"),
    ]
    for kwargs, status, words in cases:
        kwargs.setdefault("headers", auth())
        r = requests.post(url, timeout=30, **kwargs)
        assert r.status_code == status, (kwargs.get("json"), r.text)
        assert words in r.json()["error"]["message"]
    r = requests.post(f"{server}/v1/completions", json={"prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{server}/v1/sessions/sess_nope", headers=auth(), timeout=30).status_code == 404
    rows_before = step_rows(server)
    ok = requests.post(url, json=ok_body, headers=auth(), timeout=60)
    assert ok.status_code == 200 and set(ok.json()["speculation"]) >= {
        "acceptance_rate",
        "tokens_per_forward",
    }
    # Every token but the last sampled one ran through a forward, but for the chat template's
    # system turn: its page came from the prefix cache (the requests before asked other things).
    usage = ok.json()["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < usage["prompt_tokens"]
    assert step_rows(server) - rows_before >= usage["prompt_tokens"] - cached + usage["completion_tokens"] - 1
    assert requests.get(f"{server}/health", timeout=5).json()["status"] == "ok"
    for path in ("/metrics", "/openapi.json"):  # they follow --api-keys
        assert requests.get(f"{server}{path}", timeout=30).status_code == 401
        assert requests.get(f"{server}{path}", headers=auth(), timeout=30).status_code == 200
    assert requests.get(f"{server}/docs", timeout=30).status_code == 404


def test_sessions_belong_to_their_key_and_delete_really_deletes(server, redis_url) -> None:
    import redis

    session = new_session(server)
    ingest(server, session, "The secret color is teal. " * 60, as_file=False)
    stats = requests.get(f"{server}/v1/sessions/{session}", headers=auth(), timeout=30).json()
    assert stats["tokens"] > 300 and stats["documents"][0]["name"] == "notes"
    listed = requests.get(f"{server}/v1/sessions", headers=auth(), timeout=30).json()["data"]
    assert session in [s["id"] for s in listed]

    for method in ("get", "delete"):
        r = requests.request(method, f"{server}/v1/sessions/{session}", headers=auth(KEY_B), timeout=30)
        assert r.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client(server, KEY_B).chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "What is the secret color?"}],
            extra_body={"session_id": session},
        )
    assert session not in [
        s["id"] for s in requests.get(f"{server}/v1/sessions", headers=auth(KEY_B), timeout=30).json()["data"]
    ]

    r_client = redis.Redis.from_url(redis_url)
    pattern = session_prefix(session).replace("{", "\\{") + "*"
    assert list(r_client.scan_iter(match=pattern))  # blocks, tokens, record
    deleted = requests.delete(f"{server}/v1/sessions/{session}", headers=auth(), timeout=30).json()
    assert deleted.get("deleted") and deleted["store_keys_deleted"] > 3, deleted
    assert list(r_client.scan_iter(match=pattern)) == []
    assert requests.get(f"{server}/v1/sessions/{session}", headers=auth(), timeout=30).status_code == 404


def test_epub_and_pdf_uploads_keep_their_structure_and_bad_files_change_nothing(server) -> None:
    session = new_session(server)
    chapters = genesis(2)
    pdf = pdf_book(chapters)
    job = ingest_file(server, session, "genesis.epub", epub_book(chapters))
    assert (
        job["tokens_per_second"] > 0
        and job["eta_seconds"] is None
        and job["done_tokens"] == job["total_tokens"]
    )
    ingest_file(server, session, "genesis.pdf", pdf)
    stats = requests.get(f"{server}/v1/sessions/{session}", headers=auth(), timeout=30).json()
    epub_doc, pdf_doc = stats["documents"]
    assert [s["title"] for s in epub_doc["sections"]] == ["Chapter 1", "Chapter 2"]
    assert [s["kind"] for s in pdf_doc["sections"]] == ["page"] * len(pdf_doc["sections"]) != []
    for doc in (epub_doc, pdf_doc):
        ends = [doc["start"], *(t for s in doc["sections"] for t in (s["start"], s["end"])), doc["end"]]
        assert ends == sorted(ends) and doc["sections"][0]["char_start"] == 0
    bad = [
        ("genesis.pdf", pdf[: len(pdf) // 2], 400, "genesis.pdf is not a readable PDF"),
        ("secret.pdf", pdf_book(chapters[:1], password="s3cret"), 400, "secret.pdf is encrypted"),
        ("report.docx", b"PK\x03\x04", 415, "report.docx: unsupported file type"),
    ]
    for name, data, status, message in bad:
        url = f"{server}/v1/sessions/{session}/documents"
        r = requests.post(url, headers=auth(), files={"file": (name, data)}, timeout=30)
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
    after = requests.get(f"{server}/v1/sessions/{session}", headers=auth(), timeout=30).json()
    assert after["tokens"] == stats["tokens"] and after["documents"] == stats["documents"]


def test_a_book_ingested_into_a_session_is_answered_from_memory(server, tokenizer) -> None:
    """~3000 tokens through a 512-token resident window: the key is only in the kNN memory."""
    hits = 0
    depths = [0.1, 0.4, 0.7]
    for seed, depth in enumerate(depths):
        text, key = passkey_document(tokenizer, 3000, depth, seed=100 + seed)
        session = new_session(server)
        job = ingest(server, session, text)
        assert job["total_tokens"] > 2800 and job["done_tokens"] == job["total_tokens"]
        stats = requests.get(f"{server}/v1/sessions/{session}", headers=auth(), timeout=30).json()
        assert stats["memory_tokens"] > 2000 and stats["resident_tokens"] <= 512
        hits += found(key, ask_passkey(server, session))
    assert hits >= len(depths) - 1  # greedy and deterministic here; one miss of margin elsewhere


def test_answers_cite_the_passage_they_read_from_memory(server) -> None:
    """A fact planted in ~3300 tokens of the King James Bible, 512 of them resident: the
    answer's top citation is the passage holding it, at its exact characters, streamed too."""
    lines = haystack_text("bible").splitlines()[1000:1100]
    fact = "The secret number of the keeper Tobias Marlowe is 4010943."
    question = (
        "\n\nQuestion: What is the secret number of the keeper Tobias Marlowe?\nAnswer: The secret number is"
    )
    c = client(server)
    for depth, stream in ((0.2, False), (0.8, True)):  # streamed: the citations ride the last chunk
        at = int(len(lines) * depth)
        text = "\n".join([*lines[:at], fact, *lines[at:]])
        session = new_session(server)
        ingest(server, session, text, as_file=False)
        asked = dict(model="SmolLM2-135M-Instruct", prompt=question, max_tokens=8, temperature=0)
        extra = {"session_id": session, "citations": True}
        if stream:
            chunks = list(c.completions.create(**asked, stream=True, extra_body=extra))
            answer = "".join(chunk.choices[0].text for chunk in chunks)
            top = chunks[-1].choices[0].model_extra["citations"][0]
        else:
            out = c.completions.create(**asked, extra_body=extra)
            answer, top = out.choices[0].text, out.choices[0].model_extra["citations"][0]
        assert "4010943" in answer and fact in top["text"], (answer, top)
        assert text[top["char_start"] : top["char_end"]] == top["text"] and top["name"] == "notes"
        assert 0 < top["share"] < 1
    plain = c.completions.create(model="SmolLM2-135M-Instruct", prompt="Hello there", max_tokens=4)
    assert "citations" not in plain.choices[0].model_extra


def test_concurrent_clients_do_not_leak_across_sessions(server, tokenizer) -> None:
    """Four clients at once, more than the pool's 3 slots: sessions park and come back."""
    docs = [passkey_document(tokenizer, 1500, 0.3, seed=200 + i) for i in range(4)]
    sessions = [new_session(server) for _ in docs]

    def one(i: int) -> tuple[str, str]:
        ingest(server, sessions[i], docs[i][0])
        return docs[i][1], ask_passkey(server, sessions[i])

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    keys = [key for key, _ in results]
    for key, answer in results:
        assert found(key, answer), (key, answer)
        assert not any(other in answer for other in keys if other != key)


def test_a_thirty_turn_conversation_recalls_its_first_turn(server) -> None:
    """Only each new turn is sent; the first one has left the 512-token window long before the
    question, so the fact comes back through the session's memory."""
    c, session = client(server), new_session(server)

    def turn(text: str, max_tokens: int = 24) -> str:
        out = c.completions.create(
            model="SmolLM2-135M-Instruct",
            prompt=text,
            max_tokens=max_tokens,
            temperature=0,
            stop=["\n"],
            extra_body={"session_id": session},
        )
        return out.choices[0].text

    # The fact sits past the 64 sink tokens (which are never evicted).
    preamble = "Hello! Today we will talk about many things: food, music, travel, books and the weather. " * 3
    turn(f"User: {preamble}Remember this: my pass key is 48213.\nAssistant:")
    topics = ["the weather", "pasta", "Rome", "the piano", "my cat", "gardening", "running"]
    for i in range(28):
        turn(f"\nUser: Tell me something about {topics[i % len(topics)]}.\nAssistant:")
    stats = requests.get(f"{server}/v1/sessions/{session}", headers=auth(), timeout=30).json()
    assert stats["evicted_blocks"] * 16 > 100 + 128  # the fact (tokens ~64..100) left the window
    assert found("48213", turn("\nUser: What is my pass key?\nAssistant: Your pass key is", 8))


def test_restart_recovers_sessions_from_redis(tmp_path, redis_url, tokenizer) -> None:
    """Kill -9 after ingestion and a turn; a new process answers from the session's memory."""
    args = [*LONG_CONTEXT, *LIMITS, "--redis-url", redis_url]
    text, key = passkey_document(tokenizer, 2000, 0.2, seed=300)
    with infinikv_server(tmp_path, *args, stop_signal=signal.SIGKILL) as base:
        session = new_session(base, key="")
        ingest(base, session, text, key="")
        client(base, "none").completions.create(
            model="SmolLM2-135M-Instruct",
            prompt="\nThe weather today is",
            max_tokens=4,
            extra_body={"session_id": session},
        )
        before = requests.get(f"{base}/v1/sessions/{session}", timeout=30).json()
    with infinikv_server(tmp_path, *args) as base:
        after = requests.get(f"{base}/v1/sessions/{session}", timeout=30).json()
        assert after["tokens"] == before["tokens"] and not after["loaded"]
        assert found(key, ask_passkey(base, session, key="none"))
        assert requests.get(f"{base}/v1/sessions/{session}", timeout=30).json()["memory_tokens"] > 1000


def test_tokenize_detokenize_and_the_model_card(server, tokenizer) -> None:
    text = "Hello, world: the lighthouse."

    def post(path: str, body: dict) -> requests.Response:
        return requests.post(f"{server}{path}", json=body, headers=auth(), timeout=30)

    r = post("/tokenize", {"prompt": text})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert tokens == tokenizer(text)["input_ids"] and r.json()["count"] == len(tokens)
    assert r.json()["max_model_len"] > 8192  # the long-context memory holds more than the trained length
    chat = post("/tokenize", {"messages": [{"role": "user", "content": text}]}).json()
    assert chat["count"] > len(tokens) and tokenizer.decode(chat["tokens"]).count(text) == 1
    assert post("/detokenize", {"tokens": tokens}).json()["prompt"] == tokenizer.decode(tokens)
    for path, body, words in [
        ("/detokenize", {"tokens": [10**9]}, "outside the vocabulary"),
        ("/tokenize", {}, "either prompt or messages"),
        (
            "/tokenize",
            {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
            "either prompt or messages",
        ),
    ]:
        bad = post(path, body)
        assert bad.status_code == 400 and words in bad.json()["error"]["message"], bad.text
    assert requests.post(f"{server}/tokenize", json={"prompt": "a"}, timeout=30).status_code == 401
    card = client(server).models.list().data[0].model_dump()
    assert card["trained_context_length"] == 8192 and card["max_model_len"] == r.json()["max_model_len"]
    assert card["long_context"]["resident"] == 512 and card["long_context"]["window"] == 128


def test_logprobs_echo_and_several_prompts_match_transformers(server, default_model) -> None:
    """Log-probabilities in OpenAI's shapes, checked against transformers' full attention on
    the same tokens (a short prompt: inside every window, so exact attention throughout)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    text = "The lighthouse keeper climbed the stairs and"
    body = {"prompt": text, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}
    r = requests.post(f"{server}/v1/completions", json=body, headers=auth(), timeout=60)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    lp = choice["logprobs"]
    prompt_ids = default_model.tokenizer(text)["input_ids"]
    assert len(lp["tokens"]) == usage["prompt_tokens"] + usage["completion_tokens"] == len(prompt_ids) + 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert choice["text"].startswith(text) and "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][1] == len(lp["tokens"][0])
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt_ids])).logits[0].float(), -1)
    # The prompt's tokens, then the first generated one: greedy, so the likeliest.
    want = [float(ref[i - 1, t]) for i, t in enumerate(prompt_ids) if i] + [float(ref[-1].max())]
    got = lp["token_logprobs"][1 : len(prompt_ids) + 1]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-3
    for top, value in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:], strict=True):
        assert len(top) <= 2 and max(top.values()) >= value - 1e-6
    # Several prompts, as token ids: one choice each, decoded together, as when asked alone.
    prompts = [prompt_ids, default_model.tokenizer("Bread is made")["input_ids"], prompt_ids[:3]]
    many = requests.post(
        f"{server}/v1/completions",
        json={"prompt": prompts, "max_tokens": 6, "temperature": 0},
        headers=auth(),
        timeout=120,
    ).json()
    alone = [
        requests.post(
            f"{server}/v1/completions",
            json={"prompt": p, "max_tokens": 6, "temperature": 0},
            headers=auth(),
            timeout=60,
        ).json()["choices"][0]["text"]
        for p in prompts
    ]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert [c["text"] for c in many["choices"]] == alone
    chat = client(server).chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "Name a color."}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    for payload, words in [
        ({"prompt": "a", "logprobs": 2, "stream": True}, "not available with stream"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": [[1, 10**9]]}, "outside the vocabulary"),
        ({"prompt": ["a", "b"], "stream": True}, "stream takes one prompt"),
        ({"prompt": ["a", "b"], "session_id": "sess_x"}, "one text with session_id"),
    ]:
        bad = requests.post(f"{server}/v1/completions", json=payload, headers=auth(), timeout=30)
        assert bad.status_code == 400 and words in bad.json()["error"]["message"], bad.text
    bad = requests.post(
        f"{server}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
        headers=auth(),
        timeout=30,
    )
    assert bad.status_code == 400 and "needs logprobs" in bad.json()["error"]["message"]


def test_response_format_json_schema_always_parses(server) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    reply = client(server).chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        max_tokens=48,
        temperature=0.8,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
    )
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"city", "sunny"} and isinstance(value["sunny"], bool)
    url = f"{server}/v1/chat/completions"
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for fmt, words in [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}, "Invalid type"),
        ({"type": "json_schema"}, "needs json_schema"),
        ({"type": "yaml"}, "response_format"),
    ]:
        bad = requests.post(url, json={**base, "response_format": fmt}, headers=auth(), timeout=30)
        assert bad.status_code == 400 and words in bad.json()["error"]["message"], bad.text


def test_n_choices_logit_bias_penalties_and_stop_token_ids(server, tokenizer) -> None:
    c = client(server)
    ask = dict(model="SmolLM2-135M-Instruct", max_tokens=12)
    many = c.completions.create(prompt="Once upon a time", n=3, temperature=1.0, seed=5, **ask)
    again = c.completions.create(prompt="Once upon a time", n=3, temperature=1.0, seed=5, **ask)
    texts = [ch.text for ch in many.choices]
    assert [ch.index for ch in many.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [ch.text for ch in again.choices]  # seeded: choice i draws with seed + i
    plain = c.completions.create(prompt="The capital of France is", temperature=0, **ask).choices[0].text
    paris = tokenizer(" Paris")["input_ids"][0]
    biased = (
        c.completions.create(
            prompt="The capital of France is", temperature=0, logit_bias={str(paris): -100}, **ask
        )
        .choices[0]
        .text
    )
    assert "Paris" in plain and " Paris" not in biased
    first = tokenizer(plain)["input_ids"][0]
    stopped = c.completions.create(
        prompt="The capital of France is", temperature=0, extra_body={"stop_token_ids": [first]}, **ask
    ).choices[0]
    assert stopped.text == "" and stopped.finish_reason == "stop"
    repeated = c.completions.create(prompt="one one one one", temperature=0, frequency_penalty=2.0, **ask)
    assert repeated.choices[0].text.count(" one") < 4
    for payload, words in [
        ({"prompt": "a", "n": 2, "stream": True}, "n > 1"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, "token ids"),
        ({"prompt": "a", "logit_bias": {"99999999": 1}}, "outside the vocabulary"),
        ({"prompt": "a", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "a", "n": 17}, "n"),
    ]:
        bad = requests.post(f"{server}/v1/completions", json=payload, headers=auth(), timeout=30)
        assert bad.status_code == 400 and words in bad.json()["error"]["message"], bad.text
