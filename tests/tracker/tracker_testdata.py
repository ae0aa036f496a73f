"""Constants shared by the tracker tests (a module name of its own: `conftest` is taken)."""

from __future__ import annotations

from pathlib import Path

MEDIA = Path(__file__).resolve().parents[3] / "shared" / "media"
MEGAMIND = MEDIA / "megamind.avi"

#: Regressor settings of the tests: a few seconds of training instead of half a minute.
SMALL = {"regressor_samples": 6000, "regressor_epochs": 8}
