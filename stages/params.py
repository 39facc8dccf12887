"""Stage params: validate the whole params.yaml before any other stage runs.

DVC re-runs a stage only when something it lists changed, so a misspelt key added to params.yaml
(`seeed: 1`, `freeze_layer: 3`) would re-run no stage and be silently ignored. This stage depends on the
whole file: whenever params.yaml changes it validates every section (unknown keys included) and fails
with the schema's message. It also resolves what only the model libraries know: the backbone names and
whether freeze_layers and features.layers fit the backbone's layer groups (transfer.models.backbone_check),
so `resnet_9000` or `freeze_layers: 99` fail here, not after the cache stage. Its output, data/params.ok,
never changes, so a valid edit re-runs only the stages whose own params changed; download depends on it,
so it runs first.
"""

from transfer.models.backbone_check import check_layer_groups
from transfer.pipeline.errors import run_stage
from transfer.pipeline.files import write_text
from transfer.pipeline.layout import PARAMS_CHECKED_FILE, PARAMS_OK_FILE
from transfer.pipeline.params import load_params


def main() -> None:
    params = load_params()
    check_layer_groups(params.backbone, params.freeze_layers, params.features.layers, PARAMS_CHECKED_FILE)
    write_text(PARAMS_OK_FILE, "params.yaml matches the schema (src/transfer/pipeline/params.py)\n")


if __name__ == "__main__":
    run_stage("params", main)
