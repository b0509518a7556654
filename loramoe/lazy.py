"""Public names of a package that load on first use (PEP 562).

A pipeline step that only reads configs and tables, or a CLI that rejects a bad config, then
does not pay for importing torch and transformers (seconds per process).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, modules: dict[str, list[str]]
                 ) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """(__all__, __getattr__, __dir__) for `package`, whose public names live in `modules`
    ({submodule: [names]})."""
    home = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home[name]), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *home})

    return sorted(home), __getattr__, __dir__
