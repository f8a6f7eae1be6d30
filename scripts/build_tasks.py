#!/usr/bin/env python
"""Build the jsonl files of the shipped lm-evaluation-harness tasks (compressor/evaluation/tasks/) from the demo
domains' evaluation split, deterministically (same Python standard library and reasoning-gym, same files).

- demo_code_next_line (multiple choice, loglikelihood): the start of a function from a standard-library module of
  the code domain's evaluation split, and four candidate next lines: the real one and three other lines of the
  same document, re-indented like the real one (so indentation gives nothing away); the answer's position is drawn.
- demo_math_answer (generate until a newline): a held-out worked problem of the math domain up to its final
  `####`; the model completes the final answer (a number).

    python scripts/build_tasks.py            # rewrites the jsonl files (tests/test_tasks.py checks they are current)
    python scripts/build_tasks.py --check    # exit 1 when the shipped files differ from a fresh build
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from compressor.data.demo import demo_documents  # noqa: E402
from compressor.evaluation.harness import SHIPPED_TASKS_DIR  # noqa: E402

CODE_ITEMS, CODE_SEED = 200, 16
CODE_CHOICES = 4
MAX_CONTEXT_LINES = 24  # the real next line is at most this many lines after the `def`
_DEF = re.compile(r"^(\s*)(?:async\s+)?def \w+\(")
_FINAL = re.compile(r"^(?P<worked>.*\n)#### (?P<answer>-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*$", re.S)


def _candidate_line(line: str) -> bool:
    """A line of code worth predicting or offering as a distractor: not blank, not a comment, not a string alone."""
    text = line.strip()
    return 8 <= len(text) <= 80 and not text.startswith(("#", '"', "'", "@")) and not text.startswith(("def ", "class "))


def _docstring_lines(lines: list[str]) -> set[int]:
    """Indices of lines inside (or opening / closing) a triple-quoted string."""
    inside, marked = False, set()
    for index, line in enumerate(lines):
        quotes = line.count('"""') + line.count("'''")
        if inside or quotes:
            marked.add(index)
        if quotes % 2:
            inside = not inside
    return marked


def code_items(documents: list[str], rng: random.Random) -> list[dict]:
    """One candidate per function (a random eligible line of its first MAX_CONTEXT_LINES), CODE_ITEMS drawn."""
    found = []
    for doc_index, text in enumerate(documents):
        lines = text.split("\n")
        strings = _docstring_lines(lines)
        pool = sorted({line.strip() for i, line in enumerate(lines) if i not in strings and _candidate_line(line)})
        for start, line in enumerate(lines):
            match = _DEF.match(line)
            if not match or start in strings:
                continue
            indent = len(match.group(1))
            end = start + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
                end += 1
            eligible = [i for i in range(start + 2, min(end, start + MAX_CONTEXT_LINES + 1))
                        if i not in strings and _candidate_line(lines[i])]
            if eligible:
                found.append((doc_index, start, eligible, pool))
    items = []
    for doc_index, start, eligible, pool in rng.sample(found, CODE_ITEMS):
        lines = documents[doc_index].split("\n")
        target = rng.choice(eligible)
        real = lines[target]
        margin = real[: len(real) - len(real.lstrip())]
        others = [text for text in pool if text != real.strip()]
        choices = [margin + text for text in rng.sample(others, CODE_CHOICES - 1)]
        label = rng.randrange(CODE_CHOICES)
        choices.insert(label, real)
        items.append({"context": "\n".join(lines[start:target]) + "\n", "choices": choices, "label": label})
    return items


def math_items(documents: list[str]) -> list[dict]:
    """Every evaluation problem whose worked answer ends in `#### NUMBER`, in the split's order."""
    items = []
    for text in documents:
        match = _FINAL.match(text.strip())
        if match:
            items.append({"context": match.group("worked") + "####", "answer": match.group("answer")})
    return items


def build() -> dict[str, str]:
    """File name -> jsonl text."""
    tables = {
        "demo_code_next_line.jsonl": code_items(demo_documents("code", "evaluation"), random.Random(CODE_SEED)),
        "demo_math_answer.jsonl": math_items(demo_documents("math", "evaluation")),
    }
    return {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) for name, rows in tables.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args()
    built = build()
    if args.check:
        stale = [name for name, text in built.items() if (SHIPPED_TASKS_DIR / name).read_text() != text]
        print("up to date" if not stale else f"differ from a fresh build: {', '.join(stale)}")
        return 1 if stale else 0
    for name, text in built.items():
        (SHIPPED_TASKS_DIR / name).write_text(text)
        print(f"wrote {SHIPPED_TASKS_DIR / name} ({text.count(chr(10))} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
