"""Push an exported output directory to the Hugging Face Hub (`moe-compress push OUT REPO_ID`).

Everything local is checked before the first request: the repo id, that OUT is a moe-compress output, its
validation (a failed one is refused unless forced) and that a token exists. The upload itself is one
`upload_folder` commit of every file in OUT except hidden temp files (`.*`). The token is never printed,
logged or written, and is scrubbed from any error message that is passed on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from compressor.errors import UserError

PLAN_FILE = "compression_plan.json"  # the exporter's names (not imported: that pulls in torch)
VALIDATION_FILE = "validation.json"
IGNORE_PATTERNS = [".*", "*/.*"]  # hidden files/dirs at any depth: temp files, caches
LOGIN_HINT = "log in with `hf auth login`, set HF_TOKEN, or pass --token"

__all__ = ["check_push_ready", "check_repo_id", "push_output"]


def check_repo_id(repo_id: str) -> None:
    """Raise UserError unless `repo_id` is a valid Hub model id ('name' or 'namespace/name'); no network."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = _first_line(error).replace(" Use `repo_type` argument if needed.", "")
        raise UserError(f"invalid Hub repo id {repo_id!r}: {reason}") from None


def resolve_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN, else the cached login; UserError saying how to log in when there is none."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as error:  # e.g. a failed OIDC exchange
        raise UserError(f"cannot get a Hugging Face token ({type(error).__name__}): {LOGIN_HINT}") from None
    if not found:
        raise UserError(f"no Hugging Face token found: {LOGIN_HINT}")
    return found


def check_push_ready(repo_id: str, token: str | None = None) -> None:
    """The checks `export --push-to-hub` makes before exporting: repo id well-formed, a token available."""
    check_repo_id(repo_id)
    resolve_token(token)


def check_output(directory: Path) -> None:
    """Raise UserError unless `directory` is something `moe-compress export` wrote."""
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory: pass the output directory of `moe-compress export`")
    for name in ("config.json", PLAN_FILE):
        if not (directory / name).is_file():
            raise UserError(f"{directory} is not a moe-compress output (no {name}): "
                            "pass the output directory of `moe-compress export`")


def validation_gate(directory: Path, force: bool) -> str | None:
    """Refuse an output whose validation failed (unless `force`); a warning line when it was never validated."""
    path = directory / VALIDATION_FILE
    if not path.exists():
        return (f"warning: {directory} has no {VALIDATION_FILE} (exported without validation): pushing an "
                "unvalidated model; `moe-compress validate` checks it")
    from compressor.validation.schema import ValidationReport

    report = ValidationReport.load(path)
    if report.passed:
        return None
    reasons = "; ".join(report.failures) or "see validation.json"
    if not force:
        raise UserError(f"{directory} failed validation ({reasons}): not pushing; pass --force to push it anyway")
    return f"warning: pushing {directory} although its validation failed ({reasons}) (--force)"


def push_output(directory, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, force: bool = False) -> str:
    """Upload the moe-compress output `directory` to the Hub model repo `repo_id` (created if missing).

    Returns the commit URL (or the repo URL when nothing changed). Bad input, a failed validation without
    `force`, a missing token, an unreachable Hub or a rejected request raise UserError (one line, no token).
    """
    directory = Path(directory)
    check_repo_id(repo_id)
    check_output(directory)
    warning = validation_gate(directory, force)
    token = resolve_token(token)
    try:
        return _upload(directory, repo_id, private=private, revision=revision, commit_message=commit_message,
                       token=token, warning=warning)
    except UserError as error:
        raise UserError(_scrub(str(error), token)) from None
    except Exception as error:
        raise _translate(error, repo_id, token) from None


def _upload(directory: Path, repo_id: str, *, private: bool, revision: str | None, commit_message: str | None,
            token: str, warning: str | None) -> str:
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to the Hub")
    from compressor import __version__

    api = HfApi(token=token)
    # private=False leaves an existing repo's visibility (and the namespace default) alone.
    repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
    full_id = repo_url.repo_id or repo_id
    if revision and revision != constants.DEFAULT_REVISION:
        api.create_branch(full_id, branch=revision, exist_ok=True, repo_type="model")
    if warning:  # only once the Hub answered: a failure before the upload stays a one-line error
        print(warning, file=sys.stderr, flush=True)
    info = api.upload_folder(
        repo_id=full_id, folder_path=directory, repo_type="model", revision=revision,
        commit_message=commit_message or f"Upload {directory.resolve().name} (moe-compress {__version__})",
        ignore_patterns=list(IGNORE_PATTERNS),
    )
    return getattr(info, "commit_url", None) or str(repo_url)


def _translate(error: Exception, repo_id: str, token: str) -> Exception:
    """A one-line UserError (token scrubbed) for what the Hub client raised; other errors pass through (as a
    RuntimeError with the token scrubbed when their message carries it)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    endpoint = constants.ENDPOINT
    message = _scrub(_first_line(error), token)
    if isinstance(error, _connection_errors()):
        return UserError(f"cannot reach the Hugging Face Hub at {endpoint}: {message or type(error).__name__}")
    if isinstance(error, OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push to the Hub")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        server = _scrub(" ".join(str(error.server_message or "").split()), token)
        detail = f": {server}" if server else ""
        if status == 401 and not isinstance(error, RepositoryNotFoundError):
            return UserError(f"the Hub at {endpoint} rejected the token (401){detail}: {LOGIN_HINT}")
        if status in (401, 403) or isinstance(error, RepositoryNotFoundError):
            return UserError(f"no write access to {repo_id} on {endpoint} ({status}){detail}: check the repo id and "
                             f"that the token can write to it ({LOGIN_HINT})")
        return UserError(f"pushing to {repo_id} failed ({status}){detail or ': ' + message}")
    if isinstance(error, ValueError):  # e.g. the Hub rejected the model card's metadata
        return UserError(f"pushing to {repo_id} failed: {message}")
    if token in str(error):
        return RuntimeError(f"{type(error).__name__}: {_scrub(str(error), token)}")
    return error


def _connection_errors() -> tuple[type, ...]:
    """Connection failures of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    import importlib

    found: list[type] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("ConnectError", "TimeoutException", "NetworkError")),
                          ("httpx", ("ConnectError", "TimeoutException", "NetworkError")),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            imported = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(imported, name) for name in names if isinstance(getattr(imported, name, None), type)]
    return tuple(found)


def _first_line(error: BaseException) -> str:
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
