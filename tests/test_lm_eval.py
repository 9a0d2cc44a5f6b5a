"""lm-evaluation-harness against `infinikv serve` (model type `local-completions`: the
loglikelihood of each choice through `logprobs` + `echo`, and greedy generation) and
against transformers (`hf`) on the same local tasks, written here (nothing downloaded):
the two scores agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .server_process import infinikv_server

pytestmark = pytest.mark.slow

# (question, choices, answer index): facts a 135M model mostly knows, and some it does not.
CHOICES = [
    ("The capital of France is", [" Paris", " Rome", " Madrid"], 0),
    ("The capital of Japan is", [" Seoul", " Tokyo", " Beijing"], 1),
    ("Water freezes at a temperature of", [" 100 degrees", " 0 degrees", " 50 degrees"], 1),
    ("The largest planet in the solar system is", [" Mars", " Venus", " Jupiter"], 2),
    ("A week has", [" seven days", " five days", " ten days"], 0),
    ("The opposite of hot is", [" cold", " loud", " tall"], 0),
    ("Bees make", [" honey", " milk", " glass"], 0),
    ("The sun rises in the", [" west", " east", " north"], 1),
    ("A triangle has", [" four sides", " three sides", " six sides"], 1),
    ("The chemical symbol for gold is", [" Ag", " Fe", " Au"], 2),
    ("Shakespeare wrote", [" Hamlet", " Faust", " Ulysses"], 0),
    ("The first element of the periodic table is", [" helium", " hydrogen", " lithium"], 1),
]
# Two worked examples first, so the small model answers in one word.
SHOTS = "Q: What is the capital of Spain?\nA: Madrid\nQ: How many wheels does a bicycle have?\nA: two\n"
QUESTIONS = [
    ("Q: What is the capital of Italy?\nA:", "Rome"),
    ("Q: How many legs does a spider have?\nA:", "eight"),
    ("Q: What color is the sky on a clear day?\nA:", "blue"),
    ("Q: What is the opposite of up?\nA:", "down"),
    ("Q: Which animal says moo?\nA:", "cow"),
    ("Q: What do bees make?\nA:", "honey"),
]


def write_tasks(root: Path) -> None:
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in CHOICES]
    (root / "choices.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"question": SHOTS + q, "answer": a} for q, a in QUESTIONS]
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ikv_choices.yaml").write_text(
        f"""task: ikv_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "choices.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
    )
    (root / "ikv_questions.yaml").write_text(
        f"""task: ikv_questions
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "questions.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: contains
    filter:
      - function: regex
        regex_pattern: "(\\\\w+)"
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
"""
    )


def scores(model: str, model_args: str, root: Path) -> dict[str, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["ikv_choices", "ikv_questions"],
        task_manager=TaskManager(include_path=str(root)),
        batch_size=1,
    )
    results = out["results"]
    return {
        "acc": results["ikv_choices"]["acc,none"],
        "exact_match": results["ikv_questions"]["exact_match,contains"],
    }


def test_lm_eval_scores_infinikv_as_it_scores_transformers(tmp_path, default_model) -> None:
    pytest.importorskip("lm_eval")
    write_tasks(tmp_path)
    path = default_model.path
    reference = scores("hf", f"pretrained={path},dtype=float32,device=cpu", tmp_path)
    with infinikv_server(tmp_path) as base:
        args = f"model=SmolLM2-135M-Instruct,base_url={base}/v1/completions,tokenizer={path},max_length=8192"
        ours = scores("local-completions", args, tmp_path)
    print(f"lm-eval on the local tasks: infinikv {ours}, transformers {reference}")
    # The harness really scored: better than chance (1/3) and most questions answered.
    assert ours["acc"] >= 0.5 and ours["exact_match"] >= 0.5
    # Within one item of each task, the noise of float32 rounding between two engines.
    assert abs(ours["acc"] - reference["acc"]) <= 1 / len(CHOICES)
    assert abs(ours["exact_match"] - reference["exact_match"]) <= 1 / len(QUESTIONS)
