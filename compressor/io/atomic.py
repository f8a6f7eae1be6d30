"""Atomic outputs: written beside the target under an owner lock, moved into place at the end, never replacing
what appeared meanwhile unless the user asked for --overwrite.

Staging siblings are named ``.<target>.moe-compress-<id>.partial`` and each has a ``.lock`` sibling that
its writer holds locked (`flock`) while it works. The kernel drops the lock when the writer dies, even by
SIGKILL, so a later write into the same folder removes staging whose owner is gone (`remove_stale_staging`).
The final move uses ``renameat2`` (Linux): RENAME_NOREPLACE when nothing may be replaced, RENAME_EXCHANGE
to swap in a replacement in one step.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from compressor.errors import UserError

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_STAGING_RE = re.compile(r"^\.(?P<target>.+)\.moe-compress-(?P<id>[0-9a-f]{12})\.(?P<kind>partial|tmp)$")


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(2); False when the platform or file system does not offer it (the caller falls back)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def rename_noreplace(source: Path, target: Path) -> None:
    """Move `source` to `target`; FileExistsError when `target` exists (also when it appeared a moment ago)."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if source.is_dir():
        os.mkdir(target)  # fails if target exists; rename may then replace only the empty folder we just made
        try:
            os.rename(source, target)
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(target)
            raise FileExistsError(errno.EEXIST, "appeared while writing", str(target)) from None
    else:
        os.link(source, target)  # fails if target exists
        os.unlink(source)


def exchange(first: Path, second: Path) -> None:
    """Swap two existing paths atomically where the platform allows (else two renames, re-checked)."""
    if _renameat2(first, second, _RENAME_EXCHANGE):
        return
    parked = second.with_name(f".{second.name}.moe-compress-{uuid.uuid4().hex[:12]}.old")
    os.rename(second, parked)
    try:
        rename_noreplace(first, second)
    except OSError:
        os.rename(parked, second)
        raise
    os.rename(parked, first)


def _owner_alive(lock: Path) -> bool:
    """Whether the writer that created `lock` still holds it."""
    try:
        handle = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(handle)
    return False


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove staging siblings in `folder` whose writer is gone (killed, even by SIGKILL); returns what went."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for lock in entries:
        match = _STAGING_RE.match(lock.name.removesuffix(".lock") + ".partial") if lock.name.endswith(".lock") else None
        if match is None or _owner_alive(lock):
            continue
        stem = lock.name.removesuffix(".lock")
        for kind in ("partial", "tmp"):
            staged = lock.with_name(f"{stem}.{kind}")
            if staged.is_dir() and not staged.is_symlink():
                shutil.rmtree(staged, ignore_errors=True)
                removed.append(staged)
            elif staged.exists() or staged.is_symlink():
                staged.unlink(missing_ok=True)
                removed.append(staged)
        lock.unlink(missing_ok=True)
    return removed


class ScratchDirectory:
    """A private scratch folder (``PREFIX<id>`` in the system's temp folder, or `parent`), locked by its owner while
    it lives (``PREFIX<id>.lock``); making one first removes those whose owner is gone (killed, even by SIGKILL)."""

    def __init__(self, prefix: str, parent: Path | None = None):
        parent = Path(parent or tempfile.gettempdir())
        remove_stale_scratch(parent, prefix)
        name = f"{prefix}{uuid.uuid4().hex[:12]}"
        self.lock, self.path = parent / f"{name}.lock", parent / name
        self._lock_fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        os.mkdir(self.path, 0o700)

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            self.lock.unlink(missing_ok=True)


def remove_stale_scratch(parent: Path, prefix: str) -> list[Path]:
    """Remove `prefix` scratch folders in `parent` (`ScratchDirectory`) whose owner is gone; returns what went."""
    pattern = re.compile(re.escape(prefix) + r"[0-9a-f]{12}\.lock")
    removed = []
    try:
        locks = [p for p in Path(parent).iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return removed
    for lock in locks:
        if _owner_alive(lock):
            continue
        folder = lock.with_name(lock.name.removesuffix(".lock"))
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        lock.unlink(missing_ok=True)
    return removed


class _Staging:
    """A locked staging path beside `target` (a folder or a file), removed unless `commit` moved it into place."""

    def __init__(self, target: Path, directory: bool):
        self.target = target
        remove_stale_staging(target.parent)
        stem = f".{target.name}.moe-compress-{uuid.uuid4().hex[:12]}"
        self.lock = target.with_name(stem + ".lock")
        self.path = target.with_name(stem + (".partial" if directory else ".tmp"))
        self._lock_fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            if directory:
                os.mkdir(self.path)
                os.chmod(self.path, default_mode(directory=True))
        except BaseException:  # interrupted half-way: leave nothing
            self.close()
            raise

    def commit(self, overwrite: bool) -> None:
        """Move the staged output to the target: refused (UserError) when the target exists and may not be
        replaced, including one that appeared while the output was being written."""
        try:
            rename_noreplace(self.path, self.target)
            return
        except FileExistsError:
            if not overwrite:
                raise UserError(
                    f"{self.target} appeared while this output was being written; it was left as it is and "
                    "nothing was written (pass --overwrite to replace it)"
                ) from None
        if self.path.is_dir() != self.target.is_dir():
            raise UserError(f"{self.target} exists and is not a {'directory' if self.path.is_dir() else 'file'}; "
                            "nothing was written")
        exchange(self.path, self.target)  # the old output now sits at self.path and goes in `close`

    def close(self) -> None:
        """Remove the staging path (whatever it holds now) and release the lock."""
        if self.path.is_dir() and not self.path.is_symlink():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)
        os.close(self._lock_fd)
        self.lock.unlink(missing_ok=True)


def check_writable_target(path: Path, overwrite: bool, *, directory: bool = False) -> None:
    """Before any work: refuse an existing output without `overwrite`, an output of the other kind (file vs
    folder), a location under a regular file, and a folder that cannot be written."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")
        if path.is_dir() != directory:
            kind = "a directory" if path.is_dir() else "a file"
            raise UserError(f"{path} is {kind}; give a {'directory' if directory else 'file'} name for this output")
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise UserError(f"{path}: {ancestor} is a broken symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: no permission to write in {ancestor}")


def check_not_inside(output: Path, models: list[Path]) -> None:
    """Refuse an output inside (or containing) a model directory the command reads: sources are never modified."""
    resolved = Path(output).resolve()
    for model in models:
        model = Path(model).resolve()
        if resolved == model or model in resolved.parents:
            raise UserError(f"{output} is inside the model directory {model}, which this command reads; "
                            "write the output somewhere else (inputs are never modified)")
        if resolved in model.parents:
            raise UserError(f"{output} contains the model directory {model}, which this command reads; "
                            "write the output somewhere else")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give (mkstemp/mkdtemp make private 0600/0700 ones)."""
    return (0o777 if directory else 0o666) & ~_umask()


def write_text_atomic(path: Path, text: str, overwrite: bool = True) -> None:
    """Write `text` to `path` through a locked temporary sibling and an atomic move (never replacing a file that
    appeared meanwhile unless `overwrite`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _Staging(path, directory=False)
    try:
        with open(staging.path, "x") as file:
            file.write(text)
        os.chmod(staging.path, default_mode())
        staging.commit(overwrite)
    finally:
        staging.close()


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False):
    """Yield a locked staging folder beside `target`; it becomes `target` only if the block succeeds."""
    target = Path(target)
    check_writable_target(target, overwrite, directory=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _Staging(target, directory=True)
    try:
        yield staging.path
        staging.commit(overwrite)
    finally:
        staging.close()
