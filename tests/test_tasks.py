"""Task scores through lm-evaluation-harness (compressor.evaluation) in validate, export and recipes.

The reference model and a heavily pruned copy (2 of 64 experts per MoE layer, top-1, no compensation) are scored on
the shipped tasks through `validate`; the test recomputes every score without the harness: the multiple-choice
accuracy from per-choice log-likelihoods of plain `model(...)` calls, the generated answers by a greedy loop of its
own, each document alone (no batching, no padding), with the tokenizer's defaults (it adds BOS, as the harness lets
it).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import compressor  # noqa: F401 - registers our DeepSeekMoE with transformers
from compressor.errors import UserError
from compressor.evaluation.harness import SHIPPED_TASKS_DIR
from compressor.runtime import load_tokenizer
from compressor.validation.runner import gate_failures
from compressor.validation.schema import TaskResult, ValidationReport
from helpers import run_cli

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "models" / "reference"
LIMIT = 30  # documents per task
CODE, MATH = "demo_code_next_line", "demo_math_answer"
MAX_GEN_TOKENS = 12  # demo_math_answer.yaml
NUMBER = re.compile(r"^\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")  # its filter
PARTIAL_NUMBER = re.compile(r"^\s*-?[0-9,]*(?:\.[0-9]*)?")  # what more tokens could still extend into a number


def rows(task: str, limit: int = LIMIT) -> list[dict]:
    lines = (SHIPPED_TASKS_DIR / f"{task}.jsonl").read_text().splitlines()[:limit]
    return [json.loads(line) for line in lines]


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def choice_accuracy(model, tokenizer, items: list[dict]) -> list[bool]:
    """Per document: does the real line have the highest summed log-likelihood? (Trailing whitespace of the context
    goes to the continuation, as the harness does, so that the context's tokens are a prefix of the whole.)"""
    correct = []
    for item in items:
        context = item["context"].rstrip()
        prefix = tokenizer(context).input_ids
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(item["context"] + choice).input_ids
            assert whole[:len(prefix)] == prefix
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(prefix), len(whole))))
        correct.append(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    return correct


def generated_accuracy(model, tokenizer, items: list[dict]) -> list[bool]:
    """Per document: greedy tokens (at most MAX_GEN_TOKENS, until end of sequence), decoded without special tokens,
    cut at the first newline; is their leading number the answer (commas ignored)? The loop stops early once more
    tokens cannot change the leading number (something that is not part of a number follows it)."""
    correct = []
    for item in items:
        ids = tokenizer(item["context"]).input_ids
        new, text = [], ""
        with torch.no_grad():
            for _ in range(MAX_GEN_TOKENS):
                token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
                text = tokenizer.decode(new, skip_special_tokens=True)
                if PARTIAL_NUMBER.match(text).end() < len(text):
                    break
        text = text.split("\n")[0]
        match = NUMBER.match(text)
        correct.append(match is not None and match.group(1).replace(",", "") == item["answer"].replace(",", ""))
    return correct


def stderr(values: list[bool]) -> float:
    n, p = len(values), sum(values) / len(values)
    return math.sqrt(p * (1 - p) * n / (n - 1) / n)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def pruned(root) -> Path:
    """The reference model with experts 0 and 1 of every MoE layer kept, top-1, no compensation."""
    from compressor.export import export_checkpoint
    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions
    from test_validation import make_plan

    export_checkpoint(str(REFERENCE), make_plan(REFERENCE, keep=[0, 1], top_k=1), root / "pruned",
                      ExportOptions(compensation="none", run=RunOptions(device="cpu", progress=False),
                                    validation=ExportValidation(enabled=False)))
    return root / "pruned"


def validate_argv(compressed, output, *extra):
    return ["validate", REFERENCE, compressed, "-d", "math=demo:math", "--max-tokens", 256, "--seq-len", 128,
            "--device", "cpu", "-o", output, *extra]


@pytest.fixture(scope="module")
def gated(root, pruned) -> tuple[int, str, str, ValidationReport]:
    """`validate` of the pruned model on both shipped tasks (first LIMIT documents), math gated at 0.02: exit code,
    stdout, stderr and the report written."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from compressor.cli import main

    output, out, err = root / "gated.json", io.StringIO(), io.StringIO()
    argv = validate_argv(pruned, output, "--tasks", f"{CODE},{MATH}", "--task-limit", LIMIT,
                         "--max-task-drop", f"{MATH}=0.02")
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    return done.value.code, out.getvalue(), err.getvalue(), ValidationReport.load(output)


# -- the shipped tasks ------------------------------------------------------------------------------------


def test_shipped_task_files_are_current():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from build_tasks import build
    finally:
        sys.path.remove(str(REPO / "scripts"))
    built = build()
    assert sorted(built) == sorted(p.name for p in SHIPPED_TASKS_DIR.glob("*.jsonl"))
    for name, text in built.items():
        assert (SHIPPED_TASKS_DIR / name).read_text() == text, name
    code = [json.loads(line) for line in built[f"{CODE}.jsonl"].splitlines()]
    assert all(len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
               for item in code)
    labels = [item["label"] for item in code]
    assert all(labels.count(label) > len(code) / 8 for label in range(4))  # the answer's position is drawn
    math_items = [json.loads(line) for line in built[f"{MATH}.jsonl"].splitlines()]
    assert math_items and all(item["context"].endswith("\n####") and NUMBER.match(item["answer"])
                              for item in math_items)


# -- scores against an independent computation ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("side", ["original", "compressed"])
def test_task_scores_match_an_independent_computation(gated, pruned, side):
    report = gated[3]
    model, tokenizer = load(REFERENCE if side == "original" else pruned), load_tokenizer(REFERENCE)
    code = choice_accuracy(model, tokenizer, rows(CODE))
    answers = generated_accuracy(model, tokenizer, rows(MATH))
    for task, expected, metric in [(CODE, code, "acc"), (MATH, answers, "exact_match,first-number")]:
        result = report.tasks[task]
        assert result.metric == metric and result.samples == LIMIT and result.higher_is_better
        assert getattr(result, side) == pytest.approx(sum(expected) / LIMIT, abs=1e-12), task
        assert getattr(result, f"{side}_stderr") == pytest.approx(stderr(expected), rel=1e-9), task
    assert report.tasks[CODE].change == pytest.approx(report.tasks[CODE].compressed - report.tasks[CODE].original)


@pytest.mark.slow
def test_heavy_pruning_drops_the_math_score_and_fails_its_gate(gated):
    code, out, err, report = gated
    math_result = report.tasks[MATH]
    assert math_result.original >= 3 / LIMIT and math_result.compressed == 0.0  # the drop, well above 0.02
    assert code == 1 and not report.passed
    assert report.failures == [f"task {MATH}: exact_match,first-number {math_result.original:.4f} -> 0.0000 drops "
                               f"{math_result.original:.4f}, more than 0.02"]
    assert report.failures[0] in err and "validation FAILED" in err
    assert report.thresholds.max_task_drop == {MATH: 0.02}
    assert report.settings["tasks"]["names"] == [CODE, MATH] and report.settings["tasks"]["limit"] == LIMIT
    for task in (CODE, MATH):  # the summary table has a row per task
        assert re.search(rf"^{task} .* {LIMIT} ", out, re.M), out


@pytest.mark.slow
def test_tasks_alone_without_held_out_data(gated, pruned, tmp_path, capsys):
    output = tmp_path / "v.json"
    code, out, err = run_cli(["validate", REFERENCE, pruned, "--device", "cpu", "--tasks", CODE, "--task-limit", LIMIT,
                              "-o", output], capsys)
    assert code == 0, err
    report = ValidationReport.load(output)
    assert report.domains == {} and report.layers == {} and report.throughput is None and report.passed
    assert report.tasks == {CODE: gated[3].tasks[CODE]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json"]  # no perplexity or cosine figures
    assert f"wrote {output}\n" in out and "ppl original" not in out


@pytest.mark.slow
def test_task_gates_pass_and_fail_by_their_limits(gated):
    report = gated[3]
    drops = {name: t.original - t.compressed for name, t in report.tasks.items()}
    fails = lambda gate: [f.split(":")[0] for f in gate_failures({}, {}, None, None, report.tasks, gate)]  # noqa: E731
    assert fails(None) == []
    assert fails(max(drops.values()) + 1e-9) == []
    assert fails(drops[MATH] - 1e-9) == [f"task {MATH}"] + ([f"task {CODE}"] if drops[CODE] > drops[MATH] else [])
    assert fails({CODE: drops[CODE] - 1e-9}) == [f"task {CODE}"]
    with pytest.raises(UserError, match="not evaluated"):
        fails({"hellaswag": 0.1})


def test_lower_is_better_tasks_and_non_finite_scores():
    def result(original, compressed, higher_is_better=True):
        return TaskResult(metric="m", original=original, original_stderr=None, compressed=compressed,
                          compressed_stderr=None, change=compressed - original, higher_is_better=higher_is_better,
                          samples=10)

    tasks = {"perplexity_like": result(10.0, 10.5, higher_is_better=False), "acc": result(0.5, 0.52)}
    assert gate_failures({}, {}, None, None, tasks, 0.4) == ["task perplexity_like: m 10.0000 -> 10.5000 drops "
                                                             "0.5000, more than 0.4"]
    assert gate_failures({}, {}, None, None, tasks, 0.6) == []
    broken = {"acc": result(0.5, float("nan"))}
    for gate in (None, 0.5):  # a NaN score fails with or without a gate
        assert gate_failures({}, {}, None, None, broken, gate) == [
            "task acc: score is not a finite number (original 0.5, compressed nan)"]


def test_task_result_rejects_unknown_keys():
    with pytest.raises(Exception, match="accuracy"):
        TaskResult.model_validate({"metric": "acc", "original": 0.5, "original_stderr": 0.1, "compressed": 0.4,
                                   "compressed_stderr": 0.1, "change": -0.1, "higher_is_better": True,
                                   "samples": 4, "accuracy": 0.5})


# -- export and recipes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_scores_tasks_into_validation_json_and_card(root, gated):
    from compressor.export import export_checkpoint
    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions
    from test_validation import make_plan

    out = root / "exported"
    result = export_checkpoint(str(REFERENCE), make_plan(REFERENCE, keep=[0, 1], top_k=1), out, ExportOptions(
        compensation="none", run=RunOptions(device="cpu", progress=False, seq_len=128),
        validation=ExportValidation(data={"math": "demo:math"}, max_tokens=256, tasks=(MATH,), task_limit=LIMIT,
                                    max_task_drop=0.02)))
    saved = ValidationReport.load(out / "validation.json")
    assert not result.validation.passed and saved.tasks == {MATH: gated[3].tasks[MATH]}  # same model, same scores
    card = (out / "README.md").read_text().split("## Validation", 1)[1].split("\n## ", 1)[0]
    assert f"the first {LIMIT} per task" in card and "**FAILED**" in card
    score, error = saved.tasks[MATH].original, saved.tasks[MATH].original_stderr
    assert f"| {MATH} | exact_match,first-number | {LIMIT} | {score:.4f} ± {error:.4f} | 0.0000 ± 0.0000 |" in card


@pytest.mark.slow
def test_recipe_reads_task_keys_and_checks_tasks_before_running(tmp_path):
    from compressor.recipe import check_recipe_runnable, load_recipe

    text = (f"model: {REFERENCE}\nwork_dir: {tmp_path / 'work'}\ndevice: cpu\nprofile:\n  domains:\n    math: demo:math\n"
            "export:\n  compensation: none\nvalidate:\n  domains:\n    math: demo:math\n  tasks: [TASK]\n  task_limit: 5\n"
            "  max_task_drop: {TASK: 0.02}\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("TASK", MATH))
    recipe = load_recipe(path)
    assert recipe.validate_.tasks == [MATH] and recipe.validate_.max_task_drop == {MATH: 0.02}
    check_recipe_runnable(recipe)
    path.write_text(text.replace("TASK", "demo_nonexistent"))
    with pytest.raises(UserError, match=r"^key 'validate.tasks': unknown task 'demo_nonexistent'"):
        check_recipe_runnable(load_recipe(path))
    path.write_text(text.replace("TASK", MATH).replace("task_limit: 5", "task_limit: 0"))
    with pytest.raises(UserError, match="task_limit"):
        load_recipe(path)


# -- bad input ----------------------------------------------------------------------------------------------


BAD = {  # the first two index the installed harness's tasks (seconds)
    "unknown task": (["--tasks", "demo_nonexistent"], "unknown task 'demo_nonexistent'"),
    "task needing a download": (["--tasks", "arc_easy"], "task 'arc_easy' needs data that is not on this machine"),
    "gate for a task not evaluated": (["--tasks", CODE, "--max-task-drop", f"{MATH}=0.02"],
                                      f"names {MATH}, which is not evaluated"),
    "gate without tasks": (["--max-task-drop", "0.02"], "no task is evaluated"),
    "unreadable gate": (["--tasks", CODE, "--max-task-drop", "lots"], "--max-task-drop 'lots'"),
    "non-finite gate": (["--tasks", CODE, "--max-task-drop", f"{CODE}=nan"], "must be a finite number"),
    "include not a folder": (["--tasks", CODE, "--tasks-include", "nowhere"], "--tasks-include nowhere"),
    "zero limit": (["--tasks", CODE, "--task-limit", "0"], "--task-limit"),
}


NO_DATA = {  # without -d
    "neither data nor tasks": ([], "nothing to validate"),
    "perplexity gate without data": (["--tasks", CODE, "--max-ppl-increase", "0.1"], "need held-out data"),
}


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if i < 2 else case
                                  for i, case in enumerate(BAD)] + list(NO_DATA))
def test_bad_task_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    output = tmp_path / "v.json"
    if case in NO_DATA:
        extra, expected = NO_DATA[case]
        argv = ["validate", REFERENCE, REFERENCE, "-o", output, *extra]
    else:
        extra, expected = BAD[case]
        argv = validate_argv(REFERENCE, output, *extra)
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (case, out, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_task_from_an_include_folder(tmp_path, capsys):
    """A task of one's own (harness YAML + local jsonl, relative data file) is found through --tasks-include."""
    folder = tmp_path / "mine"
    folder.mkdir()
    yaml_text = (SHIPPED_TASKS_DIR / f"{CODE}.yaml").read_text().replace(f"task: {CODE}", "task: my_next_line")
    (folder / "my_next_line.yaml").write_text(yaml_text.replace(f"{CODE}.jsonl", "items.jsonl"))
    items = rows(CODE, 6)
    (folder / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    output = tmp_path / "v.json"
    code, out, err = run_cli(validate_argv(REFERENCE, output, "--tasks", "my_next_line", "--tasks-include", folder),
                             capsys)
    assert code == 0, err
    result = ValidationReport.load(output).tasks["my_next_line"]
    model, tokenizer = load(REFERENCE), load_tokenizer(REFERENCE)
    expected = sum(choice_accuracy(model, tokenizer, items)) / len(items)
    assert result.samples == len(items) and result.original == result.compressed == pytest.approx(expected)
