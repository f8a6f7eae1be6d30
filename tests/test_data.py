"""Demo domains: real text, deterministic non-overlapping splits, clear errors; roff rendering; data sources."""

import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from compressor.data import DEMO_DOMAINS, SPLITS, demo_documents, describe_domain, fetch_sources, sources_dir
from compressor.data import demo
from compressor.data.cli import data as data_cli
from compressor.data.roff import roff_to_text
from compressor.data.sources import load_source, parse_named_sources
from compressor.errors import UserError

ROFF_LEFTOVERS = re.compile(r"\\f[BIRP(\[]|\\\((em|en|aq|dq|bu|co|hy|lq|rq)|\\\*[(\[]|\\s[-+]?\d")
MACRO_LINE = re.compile(r"^(\.\\\"|[.'](TH|SH|SS|PP|LP|TP|IP|HP|B|I|BR|BI|IR|RB|RI|RS|RE|nf|br|sp|ie|UR|UE|EX|EE)( |$))")


@pytest.fixture(scope="session", autouse=True)
def fetched():
    """The Debian sources, unpacked once (offline through apt's package cache; about a second)."""
    return fetch_sources()


def test_api_names():
    assert DEMO_DOMAINS == ("code", "math", "legal", "english", "french", "german")
    assert SPLITS == ("train", "calibration", "evaluation")


@pytest.mark.parametrize("name", DEMO_DOMAINS)
def test_splits_are_non_empty_disjoint_and_deterministic(name):
    splits = {split: demo_documents(name, split) for split in SPLITS}
    for split, documents in splits.items():
        assert documents, f"{name}/{split} is empty"
        assert all(isinstance(doc, str) and len(doc) >= 200 for doc in documents)
        assert documents == demo_documents(name, split)
    train, calibration, evaluation = (set(splits[s]) for s in SPLITS)
    assert not train & calibration and not train & evaluation and not calibration & evaluation
    sizes = {split: sum(map(len, docs)) for split, docs in splits.items()}
    assert sizes["train"] > 10 * sizes["evaluation"] > 0 and sizes["train"] > 10 * sizes["calibration"]
    # extracting again from the sources (not the cache) gives exactly the same documents in the same order
    assert demo._split_documents(name, demo.DOMAINS[name].read()) == splits


def test_long_texts_are_chunked_before_splitting():
    for name in ("code", "legal", "english", "french", "german"):
        lengths = [len(doc) for split in SPLITS for doc in demo_documents(name, split)]
        assert max(lengths) <= 6000, name
    novels = [len(doc) for split in SPLITS for doc in demo_documents("english", split)]
    assert len(novels) > 500 and sum(2000 <= n <= 6000 for n in novels) > 0.95 * len(novels)
    code = demo_documents("code", "train")
    assert any(doc.startswith("def ") or "\n    def " in doc for doc in code)  # indentation kept


def test_domains_hold_the_text_they_claim():
    code = demo_documents("code", "evaluation")
    assert sum("def " in doc for doc in code) > len(code) / 2
    math = demo_documents("math", "evaluation")
    assert all(doc.count("\n") >= 2 and re.search(r"\S\n+#### -?[\d.,]+$", doc) for doc in math)
    french = " ".join(demo_documents("french", "evaluation"))
    assert french.count("é") > 100 and " les " in french and "è" in french and "à" in french
    german = " ".join(demo_documents("german", "evaluation"))
    assert german.count("ü") + german.count("ä") > 50 and " der " in german
    english = " ".join(demo_documents("english", "evaluation"))
    assert " the " in english and ("Elizabeth" in english or "Emma" in english or "Anne" in english)
    legal = " ".join(demo_documents("legal", "evaluation"))
    assert "license" in legal.lower() and "\nkey: " not in legal and not legal.lstrip().startswith("---")


@pytest.mark.parametrize("name", ["french", "german"])
def test_man_pages_have_no_roff_left(name):
    for split in ("calibration", "evaluation"):
        for doc in demo_documents(name, split):
            assert not ROFF_LEFTOVERS.search(doc), ROFF_LEFTOVERS.search(doc)
            assert not any(MACRO_LINE.match(line) for line in doc.splitlines()), doc[:300]


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
        "\\(em fin\\(aq \\e\\(dqx\\(dq \\f(CWmono\\fR \\&.",
        ".SS Exemple",
        ".nf",
        "  a  b",
        "  c",
        ".fi",
        "Voir",
        ".UR https://example.org/",
        "le site",
        ".UE .",
    ])
    assert roff_to_text(source) == (
        "NOM\n\n"
        "ls - Afficher le contenu de répertoires\n\n"
        "SYNOPSIS\n\n"
        "ls [OPTION]...\n\n"
        "-a, --all\n"
        "inclure les entrées débutant par « . » ls(1), deux mots — fin' \\\"x\" mono .\n\n"
        "Exemple\n\n"
        "  a  b\n"
        "  c\n\n"
        "Voir le site <https://example.org/>."
    )


def test_roff_conditionals_definitions_tables_and_mdoc():
    source = "\n".join([
        ".de XX",
        "hidden \\\\$1",
        "..",
        ".ie n .ds Q \\(lqnroff\\(rq",
        ".el .ds Q troff",
        ".if t \\{\\",
        "not shown",
        ".\\}",
        "Texte \\*Q \\*(Aqok\\*(Aq",
        ".TS",
        "tab(:);",
        "l l.",
        "Clé:Valeur",
        "_",
        "a:b",
        ".TE",
        ".Sh BESCHREIBUNG",
        ".Nm ssh",
        ".Op Fl v",
        ".Xr ssh_config 5 .",
    ])
    assert roff_to_text(source) == (
        "Texte “nroff” 'ok'\n\nClé Valeur\na b\n\nBESCHREIBUNG\n\nssh [-v] ssh_config(5)."
    )


def test_unknown_domain_and_split_are_one_line_errors():
    with pytest.raises(UserError, match="unknown demo domain 'klingon'; known: code, math, legal") as error:
        demo_documents("klingon", "train")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="unknown split 'test'; use one of train, calibration, evaluation") as error:
        demo_documents("code", "test")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="unknown demo domain"):
        describe_domain("klingon")


def test_missing_debian_source_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_COMPRESS_SOURCES", str(tmp_path))
    assert sources_dir() == tmp_path
    for name in ("english", "french", "german"):
        with pytest.raises(UserError, match="run `moe-compress data fetch`") as error:
            demo_documents(name, "train")
        assert "\n" not in str(error.value)
        assert describe_domain(name)["available"] is False
    info = describe_domain("math")  # needs no Debian package
    assert info["available"] is True and all(info["documents"][split] > 0 for split in SPLITS)
    assert (tmp_path / "cache").is_dir()  # extracted documents are cached where the sources live
    result = CliRunner().invoke(data_cli, ["list"])
    assert result.exit_code == 0 and "moe-compress data fetch" in result.output
    assert re.search(r"^math +yes +\d+ +\d+ +\d+", result.output, re.M)
    assert re.search(r"^german +no", result.output, re.M)


@pytest.mark.parametrize("name, module", [("math", "reasoning_gym"), ("legal", "licensedcode")])
def test_missing_demo_extra_names_the_install_command(tmp_path, monkeypatch, name, module):
    monkeypatch.setenv("MOE_COMPRESS_SOURCES", str(tmp_path))  # no cache there
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    with pytest.raises(UserError, match=re.escape("pip install 'moe-compress[demo]'")):
        demo_documents(name, "train")
    assert describe_domain(name)["available"] is False


def test_fetch_is_idempotent_without_apt(monkeypatch, fetched):
    monkeypatch.setattr(demo.shutil, "which", lambda _: None)  # would fail if it tried to download again
    assert fetch_sources() == fetched
    assert all((fetched / package / ".extracted").is_file() for package in demo.DEBIAN_PACKAGES)


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
    demo_source = load_source("demo:math@evaluation")
    assert demo_source.texts == demo_documents("math", "evaluation") and demo_source.details["split"] == "evaluation"
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
    assert load_source(f"{rows}#body").texts == ["hello", "world"]  # the source names its own text field
    with pytest.raises(UserError, match="no field 'title'"):
        load_source(f"{rows}#title", text_field="body")
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
