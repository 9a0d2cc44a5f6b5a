"""`infinikv generate "prompt"` and `infinikv chat`: the command-line front end."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from pydantic import ValidationError

from infinikv.attention.backends import BACKENDS
from infinikv.documents import Document, read_path
from infinikv.engine.regions import DTYPES
from infinikv.engine.requests import Turn, TurnResult, ingest_blocking, stream_turn
from infinikv.engine.sampling import SamplingParams
from infinikv.engine.scheduler import Engine
from infinikv.engine.sequence import ProgressFn
from infinikv.errors import DocumentError, InfinikvError
from infinikv.memory.index import INDEX_KINDS
from infinikv.model.linear import QUANTIZATIONS
from infinikv.service.settings import Settings

PROG = "infinikv"


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line (no usage dump), exit status 2 like argparse.
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _build_parser() -> ArgumentParser:
    common = ArgumentParser(add_help=False)
    g = common.add_argument_group("model")
    g.add_argument("--model", help="model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", choices=list(DTYPES))
    g.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="bf16: bfloat16 weights, float32 compute; int4: 4-bit weight matrices; int4-decode: "
        "also keeps float32 ones for prefill (all CPU)",
    )
    g.add_argument("--device", help="torch device (default: cpu)")
    g.add_argument(
        "--attention-backend",
        choices=BACKENDS,
        help="auto: the Triton kernels on CUDA, the C kernels on the CPU (float32), else plain PyTorch",
    )
    g.add_argument("--cache-dir", help="where converted GGUF weights are cached")
    g.add_argument("--page-size", type=_positive_int, help="KV cache page size in tokens")
    g.add_argument("--chunk-size", type=_positive_int, help="prefill chunk size in tokens")
    g.add_argument("--max-seq-len", type=_positive_int, help="tokens the KV cache holds")
    g.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    g.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        default=None,
        help="compute every prompt whole (default: reuse the KV pages of a prompt prefix seen before)",
    )
    g.add_argument(
        "--kv-dtype",
        choices=list(DTYPES),
        help="what the KV pages keep keys and values in (default: the model's dtype); bfloat16 "
        "halves the bytes a decode step reads from its context",
    )
    lc = common.add_argument_group("long context (unset knobs derive from the trained length)")
    lc.add_argument(
        "--no-long-context",
        dest="long_context",
        action="store_false",
        default=None,
        help="plain attention; the KV pool then bounds the sequence (--max-seq-len)",
    )
    lc.add_argument("--resident", type=_positive_int, help="tokens kept in the KV pages, sinks included")
    lc.add_argument("--sinks", type=int, help="first tokens never evicted (multiple of the page size)")
    lc.add_argument("--window", type=_positive_int, help="Self-Extend neighbor window")
    lc.add_argument("--group", type=_positive_int, help="Self-Extend group size")
    lc.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        default=None,
        help="drop evicted blocks (sliding window) instead of searching them",
    )
    lc.add_argument(
        "--memory-top-k", type=_positive_int, help="memory entries per query head (token granularity)"
    )
    lc.add_argument(
        "--memory-blocks",
        type=_positive_int,
        help="memory blocks per position and kv-head (block granularity)",
    )
    lc.add_argument(
        "--sketch-channels",
        type=_positive_int,
        help="query channels that rank memory blocks for decoding (block granularity)",
    )
    lc.add_argument(
        "--sketch-every",
        type=_positive_int,
        help="positions per full read of the key sketch; between, its favourites only (default 1)",
    )
    lc.add_argument("--memory-distance", type=_positive_int, help="relative position memory is read at")
    lc.add_argument(
        "--memory-span",
        type=_positive_int,
        help="memory keys keep their order within spans of this many tokens",
    )
    lc.add_argument(
        "--memory-token-top-k",
        type=_count,
        help="memory tokens each query head of the answering positions reads (block granularity; 0: blocks)",
    )
    lc.add_argument(
        "--evict-after",
        type=_count,
        help="tokens kept resident before the first eviction (default 0: from the first full block)",
    )
    lc.add_argument(
        "--reread",
        type=_count,
        help="passages an answer past the resident window re-reads, by its question's attention (0: off)",
    )
    lc.add_argument("--reread-margin", type=_count, help="tokens kept on either side of a re-read passage")
    lc.add_argument("--reread-tail", type=_positive_int, help="last tokens of the input a re-read keeps")
    lc.add_argument(
        "--chunk-dtype",
        choices=list(DTYPES),
        help="what prefill chunks past the window attend in (default: bfloat16 with AMX or AVX512-BF16)",
    )
    lc.add_argument("--index", choices=INDEX_KINDS, help="FAISS index for the memory")
    lc.add_argument(
        "--granularity",
        choices=["token", "block"],
        help="memory retrieval: top-k tokens, or whole blocks ranked by a per-block summary",
    )
    lc.add_argument(
        "--ram-budget-mb",
        type=_positive_int,
        help="host RAM for evicted blocks and search structures (block granularity): sets the longest input",
    )
    sp = common.add_argument_group("speculative decoding")
    sp.add_argument("--draft", help="lookup | self:N (the first N layers) | model (with --draft-model)")
    sp.add_argument("--draft-model", help="draft model sharing the tokenizer (directory, .gguf, hub id)")
    sp.add_argument("--num-draft", type=_positive_int, help="most tokens drafted per step (default 8)")
    common.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sampling = ArgumentParser(add_help=False)
    s = sampling.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=_positive_int, default=256)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")

    parser = ArgumentParser(prog=PROG, description="Long-context LLM generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", parents=[common, sampling], help="complete one prompt")
    gen.add_argument("prompt", help="the prompt text (the question, with --file)")
    gen.add_argument(
        "--file", help="a document read before the prompt (.txt, .md, .html, .epub, .pdf: a book, a manual)"
    )
    gen.add_argument(
        "--chat-template", action="store_true", help="wrap the prompt as one user turn of the chat template"
    )
    gen.add_argument(
        "--citations",
        action="store_true",
        help="after the answer, the passages of the input it attended to most",
    )
    sub.add_parser("chat", parents=[common, sampling], help="interactive chat (/reset, /exit)")
    srv = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server")
    srv.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (default: 8000)")
    srv.add_argument("--served-model-name", help="model id in the API")
    srv.add_argument("--api-keys", help="comma-separated Bearer keys (default: no auth)")
    srv.add_argument("--redis-url", help="store of the sessions (default: in-process, gone with it)")
    srv.add_argument(
        "--redis-cluster", action="store_true", default=None, help="--redis-url is a Redis Cluster node"
    )
    srv.add_argument("--slots", type=_positive_int, help="sequences the KV pool holds at once")
    srv.add_argument(
        "--step-tokens", type=_positive_int, help="prompt tokens per engine round beside the decode batch"
    )
    srv.add_argument(
        "--max-batch", type=_positive_int, help="most decode tokens in one forward (1: no batching)"
    )
    srv.add_argument("--max-queue", type=_positive_int, help="queued requests before 429")
    srv.add_argument("--max-body-bytes", type=_positive_int, help="largest request body")
    srv.add_argument("--max-tokens-limit", type=_positive_int, help="largest max_tokens of a request")
    srv.add_argument(
        "--public-metrics", action="store_true", default=None, help="with --api-keys, /metrics without a key"
    )
    srv.add_argument(
        "--lease-seconds", type=float, help="a session lease's time to live across servers (default 30)"
    )
    srv.add_argument(
        "--lease-wait", type=float, help="longest wait for a session another server holds (default 30)"
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        citations=getattr(args, "citations", False),
    )


def _progress_bar() -> ProgressFn:
    from tqdm import tqdm

    bar: list[tqdm] = []

    def update(done: int, total: int) -> None:
        if not bar:
            if done >= total:  # a bar is only worth it when the prompt spans several chunks
                return
            bar.append(tqdm(total=total, unit="tok", desc="prefill", disable=None, leave=False))
        bar[0].update(done - bar[0].n)
        if done >= total:
            bar[0].close()

    return update


def _stream(engine: Engine, turn: Turn) -> str:
    """Run the turn on the engine, writing its text to stdout as it comes (and drafting stats
    to stderr); return the text."""
    for item in stream_turn(engine, turn):
        if isinstance(item, TurnResult):
            break
        sys.stdout.write(item.text)
        sys.stdout.flush()
    if item.speculation:
        s = item.speculation
        print(
            f"\n[speculation: {s['accepted']}/{s['drafted']} drafts accepted, "
            f"{s['tokens_per_forward']:.2f} tokens per target forward]",
            file=sys.stderr,
            end="",
        )
    sys.stdout.write("\n")
    for i, c in enumerate(item.citations, 1):
        where = (
            f"{c.name}{'' if c.section is None else ', ' + c.section}, characters {c.char_start}-{c.char_end}"
        )
        sys.stdout.write(f"[{i}] {where} ({c.share:.1%} of the attention): {' '.join(c.text.split())}\n")
    return item.text


def _read_file(args: argparse.Namespace) -> Document | None:
    """The --file's document, read before the model loads (a bad file fails fast)."""
    if not args.prompt.strip():
        raise InfinikvError("empty prompt")
    if not args.file:
        return None
    try:
        return read_path(args.file)
    except (OSError, DocumentError) as e:
        raise InfinikvError(f"cannot read --file {args.file}: {e}") from e


def _generate(
    engine: Engine, document: Document | None, args: argparse.Namespace, params: SamplingParams
) -> None:
    """One prompt; with a --file, a session of its own holds the document (chapters and
    pages kept, for citations) and the prompt follows it."""
    session_id = None
    text = args.prompt
    if document is not None:
        session_id = engine.call_blocking(lambda e: e.sessions.create("").id)
        text = "\n\n" + args.prompt
    try:
        if document is not None:
            ingest_blocking(engine, session_id, document, _progress_bar())
        if args.chat_template:
            message = {"role": "user", "content": args.prompt}
            turn = Turn(params, messages=[message], session_id=session_id, progress=_progress_bar())
        else:
            turn = Turn(params, text=text, session_id=session_id, progress=_progress_bar())
        _stream(engine, turn)
    finally:
        if session_id is not None:
            _delete_session(engine, session_id)


def _chat(engine: Engine, params: SamplingParams) -> None:
    """A conversation in a session of the engine: each turn appends to its cache."""
    session_id = engine.call_blocking(lambda e: e.sessions.create("").id)
    print("infinikv chat: type a message; /reset clears the conversation, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if line == "/exit":
            return
        if line == "/reset":
            _delete_session(engine, session_id)
            session_id = engine.call_blocking(lambda e: e.sessions.create("").id)
            continue
        if line:
            message = {"role": "user", "content": line}
            _stream(engine, Turn(params, messages=[message], session_id=session_id, progress=_progress_bar()))


def _delete_session(engine: Engine, session_id: str) -> None:
    engine.call_blocking(lambda e: e.sessions.delete(session_id, ""), session_id=session_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = _settings(args)
        if args.command == "serve":
            from infinikv.service.server import serve

            serve(settings)
            return 0
        document = _read_file(args) if args.command == "generate" else None
        params = _sampling(args)
        from infinikv.service.runtime import build_engine

        engine = build_engine(settings, slots=1)
        engine.start()
        try:
            if args.command == "generate":
                _generate(engine, document, args, params)
            else:
                _chat(engine, params)
        finally:
            engine.stop()
    except ValidationError as e:
        err = e.errors()[0]
        print(f"{PROG}: error: invalid {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    except (InfinikvError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
