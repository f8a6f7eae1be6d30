"""Named demo domains built from text that installs offline (Python stdlib, PyPI and Debian packages).

Every domain is a list of documents (long texts chunked at blank lines), split by a stable hash of each
document's id into train / calibration / evaluation (90 / 5 / 5 %). Documents whose text also occurs in
train are dropped from the other splits, so the splits never overlap. Extracted documents are cached
per domain under `sources_dir()/cache`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from compressor.data.roff import roff_to_text
from compressor.errors import UserError

SPLITS = ("train", "calibration", "evaluation")
DEBIAN_PACKAGES = ("r-cran-janeaustenr", "manpages-fr", "manpages-de")
FETCH_COMMAND = "moe-compress data fetch"
_CACHE_VERSION = "v1"
_CHUNK_CHARS = 4000
_MIN_DOC_CHARS = 200
_MATH_PROBLEMS, _MATH_SEED = 6000, 2026
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class Domain:
    name: str
    source: str
    license: str
    debian_package: str | None
    read: Callable[[], Iterator[tuple[str, str]]]  # yields (document id, text)


def sources_dir() -> Path:
    """Where fetched sources and extracted documents live (`MOE_COMPRESS_SOURCES` overrides)."""
    configured = os.environ.get("MOE_COMPRESS_SOURCES")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "moe-compress" / "sources"


def fetch_sources(dest: Path | None = None) -> Path:
    """Unpack the Debian packages holding demo texts into `dest` (no system install); idempotent."""
    dest = Path(dest) if dest is not None else sources_dir()
    dest.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEBIAN_PACKAGES if not (dest / p / ".extracted").exists()]
    if not missing:
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UserError("fetching demo sources needs apt-get and dpkg-deb (a Debian-based system)")
    with tempfile.TemporaryDirectory(prefix="moe-compress-debs-") as workdir:
        if subprocess.run(["apt-get", "download", *missing], cwd=workdir, capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            result = subprocess.run(["apt-get", "download", *missing], cwd=workdir, capture_output=True, text=True)
            if result.returncode:
                lines = (result.stderr.strip() or "unknown error").splitlines()
                raise UserError(f"apt-get download {' '.join(missing)} failed: {lines[-1]}")
        for package in missing:
            debs = sorted(Path(workdir).glob(f"{package}_*.deb"))
            if not debs:
                raise UserError(f"apt-get did not download {package}")
            target = dest / package
            shutil.rmtree(target, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(target)], check=True)
            (target / ".extracted").write_text(debs[-1].name + "\n")
    return dest


def _package_root(package: str) -> Path:
    root = sources_dir() / package
    if not (root / ".extracted").exists():
        raise UserError(f"the Debian package {package} is not fetched; run `{FETCH_COMMAND}`")
    return root


def _chunks(text: str, limit: int = _CHUNK_CHARS) -> Iterator[str]:
    """Split `text` at blank lines into pieces of about `limit` characters."""
    piece: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        if size and size + len(paragraph) > limit:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(paragraph)
        size += len(paragraph) + 2
    if piece:
        yield "\n\n".join(piece)


def _read_code() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if _SKIPPED_STDLIB_DIRS.intersection(relative.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, chunk in enumerate(_chunks(text)):
            yield f"{relative}#{i}", chunk


def _read_math() -> Iterator[tuple[str, str]]:
    try:
        import reasoning_gym
    except ImportError:
        raise UserError("the math domain needs reasoning-gym: pip install 'moe-compress[demo]'") from None
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=_MATH_PROBLEMS, seed=_MATH_SEED)
    for i in range(_MATH_PROBLEMS):
        entry = dataset[i]
        yield f"gsm_symbolic/{_MATH_SEED}/{i}", f"{entry['question'].strip()}\n{entry['metadata']['answer_cot'].strip()}"


def _read_legal() -> Iterator[tuple[str, str]]:
    try:
        import licensedcode
    except ImportError:
        raise UserError("the legal domain needs licensedcode-data: pip install 'moe-compress[demo]'") from None
    folder = Path(list(licensedcode.__path__)[0]) / "data" / "licenses"
    for path in sorted(folder.glob("*.LICENSE")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            text = text[end + 4 :] if end >= 0 else ""
        for i, chunk in enumerate(_chunks(text.strip())):
            yield f"{path.name}#{i}", chunk


def _read_english() -> Iterator[tuple[str, str]]:
    import warnings

    import rdata

    warnings.filterwarnings("ignore", message="Unknown file type: assumed RDS")

    data = _package_root("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data"
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data / "Rdata.rdx").read_bytes())))
    database = (data / "Rdata.rdb").read_bytes()
    for novel in sorted(str(name) for name in index["variables"]):
        offset, length = (int(v) for v in index["variables"][novel])
        blob = zlib.decompress(database[offset + 4 : offset + length])
        lines = [str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(blob))]
        for i, chunk in enumerate(_chunks("\n".join(lines))):
            yield f"{novel}#{i}", chunk


def _read_manpages(package: str, language: str) -> Callable[[], Iterator[tuple[str, str]]]:
    def read() -> Iterator[tuple[str, str]]:
        man = _package_root(package) / "usr/share/man" / language
        for path in sorted(man.rglob("*.gz")):
            text = roff_to_text(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace"))
            for i, chunk in enumerate(_chunks(text)):
                yield f"{path.relative_to(man)}#{i}", chunk

    return read


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("code", "Python standard library modules (this Python's stdlib)", "PSF-2.0", None, _read_code),
        Domain("math", "GSM8K-style word problems with worked answers (reasoning-gym gsm_symbolic, seeded)",
               "Apache-2.0", None, _read_math),
        Domain("legal", "license texts (licensedcode-data)", "CC-BY-4.0", None, _read_legal),
        Domain("english", "Jane Austen's six novels (Debian r-cran-janeaustenr)", "public domain",
               "r-cran-janeaustenr", _read_english),
        Domain("french", "manual pages in French (Debian manpages-fr)", "GPL-3+", "manpages-fr",
               _read_manpages("manpages-fr", "fr")),
        Domain("german", "manual pages in German (Debian manpages-de)", "GPL-3+", "manpages-de",
               _read_manpages("manpages-de", "de")),
    )
}
DEMO_DOMAINS: tuple[str, ...] = tuple(DOMAINS)


def _domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise UserError(f"unknown demo domain {name!r}; known: {', '.join(DEMO_DOMAINS)}")
    return DOMAINS[name]


def _split_of(name: str, doc_id: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"{name}/{doc_id}".encode()).digest()[:4], "big") % 100
    return "train" if bucket < 90 else "calibration" if bucket < 95 else "evaluation"


def _documents_by_split(name: str) -> dict[str, list[str]]:
    domain = _domain(name)
    cache = sources_dir() / "cache" / f"{name}-{_CACHE_VERSION}.json.gz"
    if cache.exists():
        return json.loads(gzip.decompress(cache.read_bytes()))
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for doc_id, text in domain.read():
        text = text.strip()
        if len(text) >= _MIN_DOC_CHARS:
            splits[_split_of(name, doc_id)].append(text)
    train = set(splits["train"])
    seen: set[str] = set()
    for split in SPLITS[1:]:
        unique = []
        for text in splits[split]:
            if text not in train and text not in seen:
                unique.append(text)
                seen.add(text)
        splits[split] = unique
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_bytes(gzip.compress(json.dumps(splits).encode(), compresslevel=3))
    os.replace(temporary, cache)
    return splits


def demo_documents(name: str, split: str) -> list[str]:
    """The documents of demo domain `name` in `split` (train, calibration or evaluation), in a fixed order."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    documents = _documents_by_split(name)[split]
    if not documents:
        raise UserError(f"the {split} split of demo domain {name!r} is empty")
    return documents


def describe_domain(name: str) -> dict:
    """Name, source, license, whether it is available here, and document counts per split when it is."""
    domain = _domain(name)
    info = {"name": name, "source": domain.source, "license": domain.license, "available": True}
    try:
        splits = _documents_by_split(name)
    except UserError as error:
        info.update(available=False, problem=str(error))
        return info
    info["documents"] = {split: len(docs) for split, docs in splits.items()}
    info["characters"] = {split: sum(map(len, docs)) for split, docs in splits.items()}
    return info
