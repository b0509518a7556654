"""Numbers pinned by scripts/pin_expected.py: any change to the numerics shows up here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pinned_values_unchanged():
    sys.path.insert(0, str(ROOT / "scripts"))
    from pin_expected import compute

    pinned = json.loads((ROOT / "tests" / "data" / "pinned.json").read_text())
    got = compute()
    for key, value in pinned.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
