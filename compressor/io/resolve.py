"""Resolve a MODEL argument (local directory or Hub id) to a local directory."""

from __future__ import annotations

import re
from pathlib import Path

from compressor.errors import UserError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.py", "*.txt", "*.md"]


def resolve_model(source: str, revision: str | None = None) -> tuple[Path, str | None]:
    """Return (local directory, resolved revision or None for local paths).

    A Hub id is fetched with huggingface_hub (weights as safetensors only); offline, the local cache is used.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model {source!r} is a file; pass the checkpoint directory")
        return path.resolve(), None
    if not _REPO_ID.match(source):
        raise UserError(f"model {source!r} is neither a local directory nor a Hub id like 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from compressor.io.hub_access import offline_unless_reachable

    try:
        with offline_unless_reachable():
            local = snapshot_download(source, revision=revision, allow_patterns=_CHECKPOINT_FILES)
    except LocalEntryNotFoundError:
        raise UserError(
            f"model {source!r} is not in the local Hugging Face cache and the Hub cannot be reached"
        ) from None
    except HfHubHTTPError as error:
        raise UserError(f"could not fetch model {source!r} from the Hub: {str(error).splitlines()[0]}") from None
    local = Path(local)
    return local, local.name
