"""params.yaml validation: every mistake names the key, what was given and what is allowed."""

from pathlib import Path

import pytest
import yaml

from transfer.pipeline.params import ParamsError, flatten, load_params, parse_params

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def repo_params() -> dict:
    return yaml.safe_load(REPO_PARAMS.read_text())


def test_the_repository_params_are_valid():
    params = load_params(REPO_PARAMS)
    assert params.freeze_layers == "all"
    flat = flatten(params)
    assert flat["head.lr"] == params.head.lr and "backbone.name" in flat


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p["head"].update(lr_typo=0.1), r"head\.lr_typo: unknown key"),
        (lambda p: p["head"].update(lr="fast"), r"head\.lr: .*number.*given 'fast'"),
        (lambda p: p["head"].update(epochs=0), r"head\.epochs: .*greater than or equal to 1.*given 0"),
        (lambda p: p.update(freeze_layers="some"), r"freeze_layers"),
        (lambda p: p.update(freeze_layers=-2), r"freeze_layers must be 'all' or an integer >= 0"),
        (lambda p: p["split"].update(val_fraction=0.6, test_fraction=0.5), r"val_fraction \+ test_fraction"),
        (lambda p: p.update(seeed=1), r"seeed: unknown key"),
    ],
)
def test_bad_values_are_named(mutate, message):
    raw = repo_params()
    mutate(raw)
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("head: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
