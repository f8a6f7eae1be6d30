"""Data sources named on the command line (`NAME=SOURCE`) and how they become token sequences.

SOURCE forms:
- ``demo:<domain>[@<split>]``                 a demo domain (default split: the caller's, e.g. calibration);
- ``path/to/file.txt`` or a folder of ``*.txt``  each file one document;
- ``file.jsonl`` / ``file.parquet``           rows with a text field (``--text-field``, default ``text``);
- ``file.jsonl`` whose rows carry ``input_ids`` pre-tokenized: each row is one sequence exactly as given;
- ``hf:<repo>[:<config>][@<split>]``          a dataset through `datasets` (offline from its cache); the split
  may be sliced as `datasets` allows (``@train[:90%]``), so calibration and evaluation can share a split.
Row sources may end in ``#<field>`` to name their text field (overrides ``--text-field`` for that source).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from compressor.errors import UserError

SOURCE_FORMS = ("demo:<domain>[@split], a .txt file or folder, .jsonl/.parquet[#field], "
                "or hf:<repo>[:<config>][@<split>][#field]")


@dataclass
class LoadedSource:
    """Documents (text) or sequences (pre-tokenized ids) of one source, with a description for provenance."""

    kind: str
    spec: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    details: dict = field(default_factory=dict)

    @property
    def pretokenized(self) -> bool:
        return self.token_ids is not None

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        if self.pretokenized:
            for row in self.token_ids:
                digest.update(json.dumps(row).encode() + b"\n")
        else:
            for text in self.texts:
                digest.update(hashlib.sha256(text.encode()).digest())
        return digest.hexdigest()

    def description(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "content_hash": self.content_hash(), "details": self.details}


def parse_named_sources(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["code=demo:code", ...]` -> `{"code": "demo:code"}`; rejects malformed and duplicate names."""
    named: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise UserError(f"data source {spec!r} must look like NAME=SOURCE (SOURCE: {SOURCE_FORMS})")
        if name in named:
            raise UserError(f"domain name {name!r} is given twice")
        named[name] = source
    if not named:
        raise UserError("no data source given: pass -d NAME=SOURCE at least once")
    return named


def check_source(spec: str, *, default_split: str = "calibration") -> None:
    """Check a SOURCE without loading it (UserError when it cannot work): a known demo domain and split, an
    existing file of a supported kind or a folder with .txt files, or a well-formed hf: spec."""
    if spec.startswith("demo:"):
        from compressor.data.demo import SPLITS, _domain

        name, _, split = spec[len("demo:"):].partition("@")
        _domain(name)
        if (split or default_split) not in SPLITS:
            raise UserError(f"data source {spec!r}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
        return
    spec, _ = _split_text_field(spec, "text")
    if spec.startswith("hf:"):
        if not spec[len("hf:"):].partition("@")[0].partition(":")[0]:
            raise UserError(f"data source {spec!r}: expected hf:<repo>[:<config>][@<split>]")
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data source {spec!r} does not exist (SOURCE: {SOURCE_FORMS})")
    if path.is_dir():
        if not any(path.rglob("*.txt")):
            raise UserError(f"folder {path} holds no .txt files")
    elif path.suffix.lower() not in (".txt", ".jsonl", ".parquet"):
        raise UserError(f"unsupported data source {spec!r}: use {SOURCE_FORMS}")


def load_source(spec: str, *, default_split: str = "calibration", text_field: str = "text") -> LoadedSource:
    """Load one SOURCE (see module docstring). Errors are one-line UserErrors."""
    if spec.startswith("demo:"):
        return _load_demo(spec, default_split)
    spec, text_field = _split_text_field(spec, text_field)
    if spec.startswith("hf:"):
        return _load_hub_dataset(spec, default_split, text_field)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data source {spec!r} does not exist (SOURCE: {SOURCE_FORMS})")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"folder {path} holds no .txt files")
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        return _checked(LoadedSource("text-folder", spec, texts=texts, details={"files": len(files)}))
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _checked(LoadedSource("text-file", spec, texts=[path.read_text(encoding="utf-8", errors="replace")]))
    if suffix == ".jsonl":
        return _checked(_rows_source("jsonl", spec, _read_jsonl(path), text_field))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return _checked(_rows_source("parquet", spec, rows, text_field))
    raise UserError(f"unsupported data source {spec!r}: use {SOURCE_FORMS}")


def _split_text_field(spec: str, text_field: str) -> tuple[str, str]:
    """`source#field` -> (source, field) for row sources (hf:, .jsonl, .parquet); otherwise unchanged."""
    body, hash_sign, field_name = spec.rpartition("#")
    row_source = body.startswith("hf:") or body.lower().endswith((".jsonl", ".parquet"))
    if hash_sign and row_source and field_name.replace("_", "").replace("-", "").isalnum():
        return body, field_name
    return spec, text_field


def _load_demo(spec: str, default_split: str) -> LoadedSource:
    from compressor.data import demo_documents

    name, _, split = spec[len("demo:"):].partition("@")
    split = split or default_split
    texts = demo_documents(name, split)
    return _checked(LoadedSource("demo", spec, texts=texts, details={"domain": name, "split": split}))


def _load_hub_dataset(spec: str, default_split: str, text_field: str) -> LoadedSource:
    body, _, split = spec[len("hf:"):].partition("@")
    repo, _, config = body.partition(":")
    if not repo:
        raise UserError(f"data source {spec!r}: expected hf:<repo>[:<config>][@<split>]")
    split = split or "train"
    try:
        import datasets
    except ImportError:
        raise UserError("hf: data sources need the `datasets` package: pip install datasets") from None
    from compressor.io.hub_access import offline_unless_reachable

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        with offline_unless_reachable() as offline:
            dataset = datasets.load_dataset(repo, config or None, split=split)
    except Exception as error:  # datasets raises many types; the message is what matters
        where = " (the Hub cannot be reached, so only the local datasets cache was tried)" if offline else ""
        raise UserError(f"could not load dataset {spec!r}{where}: {str(error).splitlines()[0]}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    rows = dataset.to_list()
    details = {"repo": repo, "config": config or None, "split": split,
               "fingerprint": getattr(dataset, "_fingerprint", None)}
    source = _rows_source("hf-dataset", spec, rows, text_field)
    source.details.update(details)
    return _checked(source)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: each line must be a JSON object")
            rows.append(row)
    return rows


def _rows_source(kind: str, spec: str, rows: list[dict], text_field: str) -> LoadedSource:
    if rows and "input_ids" in rows[0]:
        sequences = []
        for number, row in enumerate(rows, 1):
            ids = row.get("input_ids")
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise UserError(f"{spec}: row {number}: input_ids must be a list of non-negative integers")
            if ids:
                sequences.append(ids)
        return LoadedSource(kind, spec, token_ids=sequences, details={"rows": len(rows), "pretokenized": True})
    texts = []
    for number, row in enumerate(rows, 1):
        if text_field not in row:
            raise UserError(f"{spec}: row {number} has no field {text_field!r} (choose it with --text-field)")
        if not isinstance(row[text_field], str):
            raise UserError(f"{spec}: row {number}: field {text_field!r} is not text")
        texts.append(row[text_field])
    return LoadedSource(kind, spec, texts=texts, details={"rows": len(rows), "text_field": text_field})


def _checked(source: LoadedSource) -> LoadedSource:
    items = source.token_ids if source.pretokenized else [t for t in source.texts if t.strip()]
    if not items:
        raise UserError(f"data source {source.spec!r} is empty")
    if not source.pretokenized:
        source.texts = items
    return source
