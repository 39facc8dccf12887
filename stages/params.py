"""Stage params: validate the whole params.yaml before any other stage runs.

DVC re-runs a stage only when something it lists changed, so a misspelt key added to params.yaml
(`seeed: 1`, `freeze_layer: 3`) would re-run no stage and be silently ignored. This stage depends on the
whole file: whenever params.yaml changes it validates every section (unknown keys included) and fails
with the schema's message. Its output, data/params.ok, never changes, so a valid edit re-runs only the
stages whose own params changed; download depends on it, so it runs first.
"""

from transfer.pipeline.errors import run_stage
from transfer.pipeline.files import write_text
from transfer.pipeline.layout import PARAMS_OK_FILE
from transfer.pipeline.params import load_params


def main() -> None:
    load_params()
    write_text(PARAMS_OK_FILE, "params.yaml matches the schema (src/transfer/pipeline/params.py)\n")


if __name__ == "__main__":
    run_stage("params", main)
