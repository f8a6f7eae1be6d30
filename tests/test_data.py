"""Demo domains: real text, deterministic non-overlapping splits, clear errors; roff rendering; data sources."""

import json
import re
import subprocess
import sys

import pytest

from compressor.data import DEMO_DOMAINS, SPLITS, demo_documents, describe_domain, fetch_sources
from compressor.data.roff import roff_to_text
from compressor.data.sources import load_source, parse_named_sources
from compressor.errors import UserError


@pytest.fixture(scope="module", autouse=True)
def fetched():
    fetch_sources()


@pytest.mark.parametrize("name", DEMO_DOMAINS)
def test_splits_are_non_empty_disjoint_and_deterministic(name):
    splits = {split: demo_documents(name, split) for split in SPLITS}
    for split, documents in splits.items():
        assert documents, f"{name}/{split} is empty"
        assert documents == demo_documents(name, split)
    train, calibration, evaluation = (set(splits[s]) for s in SPLITS)
    assert not train & calibration and not train & evaluation and not calibration & evaluation
    sizes = {split: sum(map(len, docs)) for split, docs in splits.items()}
    assert sizes["train"] > 10 * sizes["evaluation"] > 0


def test_domains_hold_the_text_they_claim():
    code = demo_documents("code", "evaluation")
    assert sum("def " in doc for doc in code) > len(code) / 2
    math = demo_documents("math", "evaluation")
    assert all(re.search(r"#### -?[\d.,]+\s*$", doc) for doc in math)
    french = " ".join(demo_documents("french", "evaluation"))
    assert french.count("é") > 100 and " les " in french
    german = " ".join(demo_documents("german", "evaluation"))
    assert german.count("ü") + german.count("ä") > 50 and " der " in german
    english = " ".join(demo_documents("english", "evaluation"))
    assert " the " in english and ("Elizabeth" in english or "Emma" in english or "Anne" in english)
    legal = " ".join(demo_documents("legal", "evaluation"))
    assert "license" in legal.lower() and not legal.lstrip().startswith("---")


@pytest.mark.parametrize("name", ["french", "german"])
def test_man_pages_have_no_roff_left(name):
    for doc in demo_documents(name, "evaluation"):
        assert not re.search(r"\\f[BIRP]|\\-|\\\((em|aq|dq)", doc), doc
        assert not any(line.startswith((".TH", ".SH", ".PP", '.\\"')) for line in doc.splitlines())


def test_roff_rendering():
    source = "\n".join([
        '.\\" a comment',
        '.TH LS 1 "2022"',
        ".SH NOM",
        "ls \\- Afficher le contenu de répertoires",
        ".SH SYNOPSIS",
        "\\fBls\\fP [\\fI\\,OPTION\\/\\fP]...",
        ".TP",
        "\\fB\\-a\\fP, \\fB\\-\\-all\\fP",
        "inclure les entrées débutant par «\\ .\\ »",
        ".BR ls (1),",
        '.B "deux mots"',
        "\\(em fin\\(aq",
    ])
    assert roff_to_text(source) == (
        "NOM ls - Afficher le contenu de répertoires\n\n"
        "SYNOPSIS ls [OPTION]...\n\n"
        "-a, --all inclure les entrées débutant par « . » ls(1), deux mots — fin'"
    )


def test_unknown_domain_and_split_are_one_line_errors():
    with pytest.raises(UserError, match="unknown demo domain 'klingon'; known: code, math"):
        demo_documents("klingon", "train")
    with pytest.raises(UserError, match="unknown split 'test'"):
        demo_documents("code", "test")


def test_missing_debian_source_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_COMPRESS_SOURCES", str(tmp_path))
    with pytest.raises(UserError, match="run `moe-compress data fetch`"):
        demo_documents("french", "train")
    assert describe_domain("english")["available"] is False
    assert describe_domain("code")["available"] is True  # needs no Debian package


def test_cli_errors_exit_2_with_one_line(tmp_path):
    env_code = "import sys; from compressor.cli import main; main(sys.argv[1:])"
    result = subprocess.run(
        [sys.executable, "-c", env_code, "profile", "models/reference", "-d", "x=demo:klingon", "-o", str(tmp_path / "p.json")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: unknown demo domain")
    assert not (tmp_path / "p.json").exists()


def test_named_sources_and_file_forms(tmp_path):
    assert parse_named_sources(["a=demo:code", "b=x.txt"]) == {"a": "demo:code", "b": "x.txt"}
    with pytest.raises(UserError, match="given twice"):
        parse_named_sources(["a=demo:code", "a=demo:math"])
    with pytest.raises(UserError, match="NAME=SOURCE"):
        parse_named_sources(["demo:code"])
    demo = load_source("demo:math@evaluation")
    assert demo.texts == demo_documents("math", "evaluation") and demo.details["split"] == "evaluation"
    assert load_source("demo:math").texts == demo_documents("math", "calibration")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / "a.txt").write_text("first")
    assert load_source(str(tmp_path / "docs")).texts == ["first", "second"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "hello"}) + "\n" + json.dumps({"body": "world"}) + "\n")
    assert load_source(str(rows), text_field="body").texts == ["hello", "world"]
    with pytest.raises(UserError, match="no field 'text'"):
        load_source(str(rows))
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n")
    assert load_source(str(ids)).token_ids == [[5, 6, 7]]
    assert load_source(str(ids)).content_hash() == load_source(str(ids)).content_hash()
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        load_source(str(tmp_path / "empty.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported data source"):
        load_source(str(tmp_path / "x.csv"))
    with pytest.raises(UserError, match="does not exist"):
        load_source(str(tmp_path / "nope.txt"))
