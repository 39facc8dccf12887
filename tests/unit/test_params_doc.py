"""params.yaml and the README's params reference are generated from the schema: neither drifts."""

from pathlib import Path

import yaml

from transfer.pipeline.params import Params, flatten, load_params, parse_params
from transfer.pipeline.params_doc import main, params_yaml, reference_table

ROOT = Path(__file__).resolve().parents[2]


def test_readme_params_reference_matches_the_schema():
    code = main(
        [
            "--readme",
            str(ROOT / "README.md"),
            "--dvc-yaml",
            str(ROOT / "dvc.yaml"),
            "--params",
            str(ROOT / "params.yaml"),
        ]
        + ["--check"]
    )
    assert code == 0, "README.md or params.yaml is stale: run `python -m transfer.pipeline.params_doc`"


def test_params_yaml_holds_every_key_with_the_schema_description_as_its_comment():
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    assert set(flatten(parse_params(yaml.safe_load(text)))) == set(flatten(load_params(ROOT / "params.yaml")))
    written = flatten_dict_keys(yaml.safe_load(text))
    assert set(flatten(load_params(ROOT / "params.yaml"))) <= written, "every key is written out, defaults too"
    assert "  lr: 0.01  # AdamW learning rate of the linear probe" in text.splitlines()
    assert all(len(line) <= 120 for line in text.splitlines())


def flatten_dict_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "tune.space":
            keys |= flatten_dict_keys(value, f"{name}.")
        else:
            keys.add(name)
    return keys


def test_regenerating_keeps_every_value_and_fills_missing_keys_with_defaults(tmp_path):
    raw = {
        "data": {"source": "folder", "path": "images"},
        "backbone": [{"name": "resnet18", "weights": "none"}, {"name": "efficientnet_lite0", "image_size": 96}],
        "head": {"lr": 3.0e-4, "kind": "logreg"},
        "tune": {"space": {"head.lr": {"type": "loguniform", "low": 1.0e-5, "high": 0.1}}},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    written = params_yaml(load_params(path))
    path.write_text(written)
    assert load_params(path) == parse_params(raw)  # the same settings
    assert params_yaml(load_params(path)) == written  # a fixed point: regenerating changes nothing
    assert load_params(path).head.epochs == Params.model_fields["head"].default.epochs
    assert "- name: resnet18" in written


def test_every_param_has_a_row_with_a_description():
    keys = set(flatten(load_params(ROOT / "params.yaml")))
    rows = {}
    for line in reference_table(ROOT / "dvc.yaml").splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells[-1]
    assert keys <= set(rows), f"params without a row: {sorted(keys - set(rows))}"
    assert not [key for key, description in rows.items() if not description], "every field needs a description"


def test_a_key_re_runs_the_stages_that_list_it_or_its_section():
    table = reference_table(ROOT / "dvc.yaml")
    head_lr = next(line for line in table.splitlines() if line.startswith("| `head.lr` "))
    assert head_lr.split(" | ")[3] == "train"
