"""The sha256 of a file's bytes, read in blocks: the provenance of an adapter's weights, of
the data a run trained on and of the records an evaluation scored."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
