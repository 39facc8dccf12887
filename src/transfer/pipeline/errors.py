"""Errors that are the user's to fix (bad params, data or weights), and how a stage reports them.

Each module's error class also derives from `UserError`; a stage wrapped in `run_stage` prints such an
error's message, which names the file or key and what to do, and exits non-zero without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem in the inputs (params.yaml, data, weights) with a message that says how to fix it."""


def run_stage(name: str, main: Callable[[], None]) -> None:
    try:
        main()
    except UserError as exc:
        sys.exit(f"{name}: {exc}")
