"""Where a base model lives, checked without importing torch or transformers: a config is
validated (and a bad model path reported) before any expensive import."""

from __future__ import annotations

import os
from pathlib import Path


class ModelNotAvailableError(RuntimeError):
    """The model cannot be loaded: its package is not installed or its folder is missing."""


def cache_root() -> Path:
    return Path(os.environ.get("LORAMOE_CACHE_DIR", Path.home() / ".cache" / "loramoe"))


def looks_like_path(name: str) -> bool:
    """A folder, not a hub id: hub ids are `name` or `org/name`, never `./x`, `/x`, `~/x`,
    `a/b/c` or `x/`."""
    return (name.startswith(("/", "./", "../", "~", "."))
            or os.sep in name.replace("/", "", 1) or name.endswith(("/", os.sep))
            or name.count("/") > 1)


def check_local_path(name_or_path: str) -> None:
    """A missing local model folder is reported as such (not as a malformed hub id)."""
    path = Path(name_or_path).expanduser()
    if looks_like_path(name_or_path) and not path.exists():
        raise ModelNotAvailableError(f"model {name_or_path!r}: no such folder ({path.resolve()})")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelNotAvailableError(f"model {name_or_path!r}: {path} has no config.json; a "
                                     f"model folder is what save_pretrained writes")
