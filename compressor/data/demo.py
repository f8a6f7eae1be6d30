"""Named demo domains built from text that installs offline (Python stdlib, PyPI and Debian packages).

Every domain is a list of documents. Long texts (novels, big source files, long man pages) are first cut at
paragraph / blank-line boundaries into documents of about 2,000-6,000 characters; each document then goes to
train / calibration / evaluation (about 90 / 5 / 5 %) by a stable hash of its id ("domain/path#chunk").
Documents whose exact text also occurs in train are dropped from the other splits (and calibration never
repeats in evaluation), so the splits never overlap. Extracted documents are cached per domain under
`sources_dir()/cache`, keyed by an extraction version and the versions of the sources.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from compressor.data.roff import roff_to_text
from compressor.errors import UserError

SPLITS: tuple[str, ...] = ("train", "calibration", "evaluation")
DEBIAN_PACKAGES = ("r-cran-janeaustenr", "manpages-fr", "manpages-de")
FETCH_COMMAND = "moe-compress data fetch"
INSTALL_HINT = "pip install 'moe-compress[demo]'"
_EXTRACTION_VERSION = "v3"  # with a hash of the extraction code, part of the cache file name
_TARGET_CHARS, _MAX_CHARS = 4000, 6000  # a document is closed once it reaches the target, never exceeds the max
_MIN_DOC_CHARS = 200
_MATH_PROBLEMS, _MATH_SEED = 6000, 2026
_SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
_ROFF_MANUALS = {"man.7", "man-pages.7", "mdoc.7", "roff.7", "groff.7", "groff_man.7", "groff_mdoc.7"}
_FRONT_MATTER = re.compile(r"\A---[ \t]*\n.*?\n---[ \t]*(?:\n|\Z)", re.S)
_PARAGRAPH = re.compile(r".*?(?:\n[ \t]*(?:\n[ \t]*)+|\Z)", re.S)  # a paragraph with the blank lines after it


@dataclass(frozen=True)
class Domain:
    name: str
    source: str
    license: str
    debian_package: str | None
    read: Callable[[], Iterator[tuple[str, str]]]  # yields (document id, text), in a fixed order
    fingerprint: Callable[[], str]  # versions of what the text comes from (part of the cache key)


def sources_dir() -> Path:
    """Where fetched sources and extracted documents live: `$MOE_COMPRESS_SOURCES` or ~/.cache/moe-compress/sources."""
    configured = os.environ.get("MOE_COMPRESS_SOURCES")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "moe-compress" / "sources"


def fetch_sources(dest: Path | None = None) -> Path:
    """Unpack the Debian packages holding demo texts into `dest` (default `sources_dir()`); idempotent.

    Runs `apt-get download` in a temporary folder (and `apt-get update` once if that fails) and `dpkg-deb -x`
    into `dest/<package>`; nothing is installed on the system. Returns `dest`.
    """
    dest = Path(dest).expanduser() if dest is not None else sources_dir()
    dest.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEBIAN_PACKAGES if not (dest / p / ".extracted").exists()]
    if not missing:
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise UserError(f"fetching {', '.join(missing)} needs apt-get and dpkg-deb (a Debian-based system)")
    with tempfile.TemporaryDirectory(prefix="moe-compress-debs-") as workdir:
        download = ["apt-get", "download", *missing]
        if subprocess.run(download, cwd=workdir, capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            result = subprocess.run(download, cwd=workdir, capture_output=True, text=True)
            if result.returncode:
                lines = (result.stderr.strip() or "unknown error").splitlines()
                raise UserError(f"`apt-get download {' '.join(missing)}` failed: {lines[-1]}")
        for package in missing:
            debs = sorted(Path(workdir).glob(f"{package}_*.deb"))
            if not debs:
                raise UserError(f"`apt-get download {package}` produced no .deb file")
            partial = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=dest))
            try:
                result = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(partial)], capture_output=True, text=True)
                if result.returncode:
                    raise UserError(f"`dpkg-deb -x {debs[-1].name}` failed: {result.stderr.strip().splitlines()[-1:]}")
                (partial / ".extracted").write_text(debs[-1].name + "\n")
                target = dest / package
                if target.exists() and not (target / ".extracted").exists():
                    shutil.rmtree(target)  # a leftover from an interrupted fetch
                try:
                    os.rename(partial, target)
                except OSError:
                    if not (target / ".extracted").exists():  # not fetched at the same time by someone else
                        raise
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    return dest


def _package_root(package: str) -> Path:
    root = sources_dir() / package
    if not (root / ".extracted").exists():
        raise UserError(f"the Debian package {package} is not fetched into {sources_dir()}; run `{FETCH_COMMAND}`")
    return root


def _package_version(package: str) -> str:
    return (_package_root(package) / ".extracted").read_text().strip()


def _distribution_version(distribution: str) -> str:
    try:
        return f"{distribution}-{importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"the demo data needs {distribution}: {INSTALL_HINT}") from None


# chunking -----------------------------------------------------------------------------------------------


def _units(text: str) -> Iterator[str]:
    """Pieces of `text`, in order, that concatenate to it: paragraphs (with their trailing blank lines) of at
    most the max size; longer paragraphs give lines, and over-long lines are cut after a space."""
    for match in _PARAGRAPH.finditer(text):
        paragraph = match.group()
        if not paragraph:
            continue
        if len(paragraph) <= _MAX_CHARS:
            yield paragraph
            continue
        for line in paragraph.splitlines(keepends=True):
            while len(line) > _MAX_CHARS:
                cut = line.rfind(" ", _TARGET_CHARS // 2, _TARGET_CHARS) + 1 or _TARGET_CHARS
                yield line[:cut]
                line = line[cut:]
            yield line


def _chunks(text: str) -> list[str]:
    """`text` cut at paragraph (else line) boundaries into documents of about 2,000-6,000 characters.

    A text no longer than the max stays whole. Pieces keep their exact text (code indentation included).
    """
    if len(text) <= _MAX_CHARS:
        return [text.strip("\n").rstrip()]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for unit in _units(text):
        if current and size + len(unit.rstrip()) > _MAX_CHARS:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(unit)
        size += len(unit)
        if size >= _TARGET_CHARS:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        tail = "".join(current)
        if chunks and len(chunks[-1]) + len(tail.rstrip()) <= _MAX_CHARS:
            chunks[-1] += tail
        else:
            chunks.append(tail)
    return [chunk.strip("\n").rstrip() for chunk in chunks]


def _chunked(doc_id: str, text: str) -> Iterator[tuple[str, str]]:
    for i, chunk in enumerate(_chunks(text)):
        yield f"{doc_id}#{i}", chunk


# domains ------------------------------------------------------------------------------------------------


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_code() -> Iterator[tuple[str, str]]:
    stdlib = _stdlib()
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if _SKIPPED_STDLIB_DIRS.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        yield from _chunked(relative.as_posix(), path.read_text(encoding="utf-8", errors="replace"))


def _code_fingerprint() -> str:
    return f"python-{sys.implementation.name}-{sys.version.split()[0]}-{_stdlib()}"


def _read_math() -> Iterator[tuple[str, str]]:
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(f"the math domain needs reasoning-gym: {INSTALL_HINT}") from None
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=_MATH_PROBLEMS, seed=_MATH_SEED)
    for i in range(_MATH_PROBLEMS):
        entry = dataset[i]
        worked = entry["metadata"]["answer_cot"].strip()
        yield f"gsm_symbolic/seed{_MATH_SEED}/{i}", f"{entry['question'].strip()}\n{worked}"


def _licenses_folder() -> Path:
    try:
        import licensedcode
    except ImportError:
        raise UserError(f"the legal domain needs licensedcode-data: {INSTALL_HINT}") from None
    return Path(list(licensedcode.__path__)[0]) / "data" / "licenses"


def _read_legal() -> Iterator[tuple[str, str]]:
    for path in sorted(_licenses_folder().glob("*.LICENSE")):
        text = _FRONT_MATTER.sub("", path.read_text(encoding="utf-8", errors="replace"), count=1)
        if text.strip():
            yield from _chunked(path.name, text)


def _read_english() -> Iterator[tuple[str, str]]:
    try:
        import rdata
    except ImportError:
        raise UserError(f"the english domain needs rdata: {INSTALL_HINT}") from None

    def parse(serialized: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": these are bare serializations
            return rdata.conversion.convert(rdata.parser.parse_data(serialized))

    data = _package_root("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data"
    index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    database = (data / "Rdata.rdb").read_bytes()
    for novel in sorted(str(name) for name in index["variables"]):
        offset, length = (int(v) for v in index["variables"][novel])
        lines = [str(line).strip() for line in parse(zlib.decompress(database[offset + 4 : offset + length]))]
        paragraphs, current = [], []
        for line in lines + [""]:
            if line:
                current.append(line)
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        yield from _chunked(novel, "\n\n".join(paragraphs))


def _read_manpages(package: str) -> Callable[[], Iterator[tuple[str, str]]]:
    def read() -> Iterator[tuple[str, str]]:
        man = _package_root(package) / "usr/share/man"
        for path in sorted(man.rglob("*.gz")):
            if path.is_symlink() or not path.is_file() or path.name[: -len(".gz")] in _ROFF_MANUALS:
                continue  # aliases of other pages; manuals of roff itself (full of roff source examples)
            text = roff_to_text(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace"))
            if len(text) >= _MIN_DOC_CHARS:
                yield from _chunked(path.relative_to(man).as_posix(), text)

    return read


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("code", "Python standard library modules (this interpreter's stdlib, tests excluded)", "PSF-2.0",
               None, _read_code, _code_fingerprint),
        Domain("math", f"GSM8K-style word problems with worked answers (PyPI reasoning-gym gsm_symbolic, "
                       f"{_MATH_PROBLEMS} problems, seed {_MATH_SEED})",
               "Apache-2.0", None, _read_math, lambda: _distribution_version("reasoning-gym")),
        Domain("legal", "software license texts (PyPI licensedcode-data)", "CC-BY-4.0", None, _read_legal,
               lambda: _distribution_version("licensedcode-data")),
        Domain("english", "Jane Austen's six novels (Debian r-cran-janeaustenr)", "public domain (package MIT)",
               "r-cran-janeaustenr", _read_english, lambda: _package_version("r-cran-janeaustenr")),
        Domain("french", "manual pages in French (Debian manpages-fr)", "GPL-3+", "manpages-fr",
               _read_manpages("manpages-fr"), lambda: _package_version("manpages-fr")),
        Domain("german", "manual pages in German (Debian manpages-de)", "GPL-3+", "manpages-de",
               _read_manpages("manpages-de"), lambda: _package_version("manpages-de")),
    )
}
DEMO_DOMAINS: tuple[str, ...] = tuple(DOMAINS)


def _domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise UserError(f"unknown demo domain {name!r}; known: {', '.join(DEMO_DOMAINS)}")
    return DOMAINS[name]


def _split_of(name: str, doc_id: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"{name}/{doc_id}".encode()).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "calibration" if bucket < 95 else "evaluation"


def _split_documents(name: str, documents: Iterator[tuple[str, str]]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for doc_id, text in documents:
        if len(text.strip()) >= _MIN_DOC_CHARS:
            splits[_split_of(name, doc_id)].append(text)
    seen = set(splits["train"])
    for split in SPLITS[1:]:
        kept = []
        for text in splits[split]:
            if text not in seen:  # no text of train (or of an earlier held-out split) twice
                kept.append(text)
                seen.add(text)
        splits[split] = kept
    return splits


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """The extraction code itself (this module and the roff renderer): editing it invalidates the caches."""
    from compressor.data import roff

    return hashlib.sha256(Path(__file__).read_bytes() + Path(roff.__file__).read_bytes()).hexdigest()[:12]


def _cache_path(name: str) -> Path:
    key = f"{_domain(name).fingerprint()}|{_code_version()}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
    return sources_dir() / "cache" / f"{name}-{_EXTRACTION_VERSION}-{fingerprint}.json.gz"


@functools.lru_cache(maxsize=16)
def _load_cache(path: Path, mtime_ns: int) -> dict[str, list[str]]:
    return json.loads(gzip.decompress(path.read_bytes()))


def _documents_by_split(name: str) -> dict[str, list[str]]:
    domain = _domain(name)
    cache = _cache_path(name)
    if not cache.exists():
        splits = _split_documents(name, domain.read())
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        temporary.write_bytes(gzip.compress(json.dumps(splits, ensure_ascii=False).encode(), compresslevel=3))
        os.replace(temporary, cache)
        for stale in cache.parent.glob(f"{name}-*.json.gz"):
            if stale != cache:  # made by an older extraction or from older sources
                stale.unlink(missing_ok=True)
    return _load_cache(cache, cache.stat().st_mtime_ns)


def demo_documents(name: str, split: str) -> list[str]:
    """The documents of demo domain `name` in `split` (train, calibration or evaluation), in a fixed order."""
    _domain(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    documents = _documents_by_split(name)[split]
    if not documents:
        raise UserError(f"the {split} split of demo domain {name!r} is empty; delete {sources_dir() / 'cache'} "
                        f"and run `{FETCH_COMMAND}` again")
    return list(documents)


def describe_domain(name: str) -> dict:
    """Name, source, license, whether it is available here, and document/character counts per split when it is.

    Building the counts extracts the domain when it is not cached yet (a few seconds).
    """
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
