"""Errors that are the user's to fix (bad params, data or weights), and how a stage reports them.

Each module's error class also derives from `UserError`; a stage wrapped in `run_stage` prints such an
error's message, which names the file or key and what to do, and exits non-zero without a traceback.
Ctrl-C (SIGINT) and SIGTERM end a stage the same way: one line saying what was interrupted, what became
of the MLflow run (tracking adds that to the exception as a note) and that `dvc repro` resumes.
Anything else is a bug and keeps its traceback.

Library modules report through `logging` (`log = logging.getLogger(__name__)`); `configure_logging`, called
once by `run_stage` and by the `transfer` command, shows their INFO and above on stderr as plain lines.
The stages and commands print their own one-line summaries on stdout.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Callable


class UserError(Exception):
    """A problem in the inputs (params.yaml, data, weights) with a message that says how to fix it."""


class StageInterrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every `with` block and `finally` unwinds."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise StageInterrupted(signum)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a message comes (the stage server's child rebinds it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Show this package's log messages on stderr as plain lines; calling it again changes nothing."""
    logger = logging.getLogger(__package__.split(".")[0])
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def run_stage(name: str, main: Callable[[], None]) -> None:
    configure_logging()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        main()
    except UserError as exc:
        sys.exit(f"{name}: {exc}")
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        how = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        notes = "; ".join(getattr(exc, "__notes__", [])) or "no MLflow run was open"
        print(
            f"{name}: interrupted by {how}; {notes}; `dvc repro` resumes: finished stages are kept and "
            "fine-tuning continues from its last epoch checkpoint",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + signum)
    finally:
        signal.signal(signal.SIGTERM, previous)
