"""Reading and writing the versioned JSON artifacts (profile, validation report) with one-line errors."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from compressor.errors import UserError
from compressor.io.atomic import write_text_atomic


def load_json_model(cls: type[BaseModel], path: str | Path, what: str):
    """Parse and validate `path` as `cls`; a missing file or an invalid one is a UserError naming the key."""
    path = Path(path)
    try:
        return cls.model_validate_json(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"{what} {path} does not exist") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path} is not a valid {what}: {where}: {first['msg']}") from None


def save_json_model(model: BaseModel, path: str | Path, overwrite: bool = True, **dump) -> None:
    """Write atomically; with `overwrite=False` a file that appeared meanwhile is not replaced (UserError)."""
    write_text_atomic(Path(path), model.model_dump_json(indent=1, **dump) + "\n", overwrite=overwrite)
