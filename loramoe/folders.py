"""Whether a folder can be made and written to, told before any work that would end in
writing there (a model loaded, a mixture built) and without making it."""

from __future__ import annotations

import os
from pathlib import Path


def folder_problem(folder: str | Path) -> str:
    """Why `folder` cannot be an output folder ('' if it can): it, or the nearest part of its
    path that exists, is a file or not writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{folder} cannot be made: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{folder} cannot be written to: {existing} is not writable"
    return ""
