"""Run a stage script: in the stage server when one matches this environment, else in this process.

dvc.yaml's commands are `python -m transfer.pipeline.stage stages/<name>.py`; the result is the same either way
(see transfer.pipeline.stage_server), only the start-up time differs.
"""

import sys

from transfer.pipeline.errors import configure_logging
from transfer.pipeline.stage_server import run_script

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m transfer.pipeline.stage stages/<name>.py [args...]")
    configure_logging()
    run_script(sys.argv[1], sys.argv[2:])
