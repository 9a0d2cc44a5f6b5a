"""The command line: one clear error line and a non-zero exit; a real end-to-end run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infinikv.cli import main
from infinikv.model.loader import resolve_model_dir

from .conftest import CACHE_DIR


@pytest.fixture(scope="module", autouse=True)
def converted_default_model() -> None:
    """Convert the default GGUF before any case: on a fresh machine the one-time conversion
    (its warning and progress bar on stderr) would run inside the first case that loads the
    model and add lines to the one error line that case checks."""
    resolve_model_dir(None, CACHE_DIR)


def run_cli(argv: list[str]) -> int:
    """main()'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.mark.parametrize(
    "argv,status,message",
    [
        (["generate", "   "], 1, "empty prompt"),
        (["generate", "hi", "--top-p", "2"], 1, "top_p must be in (0, 1]"),
        (["generate", "hi", "--temperature", "-1"], 1, "temperature must be >= 0"),
        (["generate", "hi", "--max-tokens", "0"], 2, "--max-tokens: must be >= 1"),
        (["generate", "hi", "--dtype", "int3"], 2, "--dtype: invalid choice"),
        (["generate", "hi", "--kv-dtype", "int8"], 2, "--kv-dtype: invalid choice"),
        (["generate", "hi", "--model", "/no/such/model"], 1, "model not found: '/no/such/model'"),
        (["generate", "hi", "--max-seq-len", "8"], 2, "invalid max_seq_len"),
        (["bogus"], 2, "invalid choice"),
        (
            ["serve", "--redis-url", "redis://127.0.0.1:1/0"],
            1,
            "cannot reach Redis at redis://127.0.0.1:1/0",
        ),
        (["generate", "hi", "--sinks", "5"], 1, "sinks S=5 must be a multiple of the page size"),
        (["generate", "hi", "--file", "/no/such/book.txt"], 1, "cannot read --file /no/such/book.txt"),
        (["generate", "hi", "--draft", "ngram"], 2, "invalid draft"),
        pytest.param(
            ["generate", "hi", "--draft", "self:30"],
            1,
            "self-draft layers must be in [1, 29]",
            marks=pytest.mark.slow,  # checked once the model is loaded
        ),
        (["generate", "hi", "--num-draft", "40"], 2, "invalid num_draft"),
        (["serve", "--port", "99999"], 2, "invalid port"),
    ],
)
def test_errors_print_one_line(capsys, argv, status, message) -> None:
    code = run_cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == status
    assert len(err) == 1 and err[0].startswith("infinikv: error:") and message in err[0], err


def test_empty_file_is_refused(tmp_path, capsys) -> None:
    book = tmp_path / "book.txt"
    book.write_text("  \n\n")
    assert run_cli(["generate", "Who is the narrator?", "--file", str(book)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"infinikv: error: cannot read --file {book}: book.txt holds no text"]


def test_model_directory_without_config(tmp_path, capsys) -> None:
    assert run_cli(["generate", "hi", "--model", str(tmp_path)]) == 1
    assert "has no config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_end_to_end_subprocess() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "infinikv.cli", "generate", "The capital of France is", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.slow
def test_chat_end_to_end_subprocess() -> None:
    """Turns go to a session of the engine; /reset starts a new one."""
    question = "What is the capital of France?"
    out = subprocess.run(
        [sys.executable, "-m", "infinikv.cli", "chat", "--max-tokens", "24"],
        input=f"{question}\n/reset\n{question}\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Paris") >= 2, out.stdout


@pytest.mark.slow
def test_generate_cites_the_passage_of_the_file_it_read(tmp_path) -> None:
    """An HTML page (the Debian Reference's first chapter) with a planted line, read by --file."""
    page = Path("/usr/share/debian-reference/ch01.en.html")
    if not page.exists():
        pytest.skip("needs debian-reference-en")
    fact = "The password of the backup server is plum-orchard-42."
    html = page.read_text(encoding="utf-8").replace("<h3", f"<p>{fact}</p><h3", 3)
    (tmp_path / "ch01.html").write_text(html[: len(html) // 8], encoding="utf-8")
    argv = [
        sys.executable,
        "-m",
        "infinikv.cli",
        "generate",
        "--file",
        str(tmp_path / "ch01.html"),
        "--citations",
    ]
    prompt = (
        "Question: What is the password of the backup server?\nAnswer: The password of the backup server is"
    )
    out = subprocess.run([*argv, prompt, "--max-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answer, cited = out.stdout.split("\n[1] ", 1)
    assert "plum-orchard-42" in answer and fact in cited.splitlines()[0], out.stdout
    assert cited.startswith("ch01.html, chapter: ")  # the file's name and the section it sits in
