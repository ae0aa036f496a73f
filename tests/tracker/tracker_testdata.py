"""Constants shared by the tracker tests (a module name of its own: `conftest` is taken)."""

from __future__ import annotations

import os
from pathlib import Path

#: ../shared/media beside the repository; DVP_TEST_MEDIA overrides it (a git worktree
#: elsewhere).
MEDIA = Path(os.environ.get("DVP_TEST_MEDIA",
                            Path(__file__).resolve().parents[3] / "shared" / "media"))
MEGAMIND = MEDIA / "megamind.avi"

#: Regressor settings of the tests: a few seconds of training instead of half a minute.
SMALL = {"regressor_samples": 6000, "regressor_epochs": 8}
