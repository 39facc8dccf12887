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


# Each of these was coerced before the schema was strict: true ran as batch size 1, "5" as 5 epochs.
@pytest.mark.parametrize(
    "key, text, message",
    [
        ("features.batch_size", "true", r"features\.batch_size: Input should be a valid integer.*given True"),
        ("finetune.epochs", '"5"', r"finetune\.epochs: Input should be a valid integer.*given '5'"),
        ("head.lr", '"1e-2"', r"head\.lr: Input should be a valid number.*given '1e-2'"),
        ("freeze_layers", '"3"', r"freeze_layers\.int: Input should be a valid integer \(given '3'\)"),
        ("freeze_layers", "3.0", r"freeze_layers\.int: .*given 3\.0"),
        ("finetune.nesterov", "1", r"finetune\.nesterov: Input should be a valid boolean.*given 1"),
        ("features.layers", "[true]", r"features\.layers\.0.*given True"),
        ("tracking.experiment", "12", r"tracking\.experiment: Input should be a valid string.*given 12"),
    ],
)
def test_values_of_another_type_are_refused_not_coerced(tmp_path, key, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(with_value(key, text))
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def with_value(key: str, text: str) -> str:
    """The repository's params.yaml with `key` (dotted, at most two levels) set to the YAML `text`."""
    lines = REPO_PARAMS.read_text().splitlines()
    section, _, name = key.rpartition(".")
    indent, inside = ("  ", False) if section else ("", True)
    for index, line in enumerate(lines):
        if section and line.startswith(f"{section}:"):
            inside = True
        elif inside and line.startswith(f"{indent}{name}:"):
            lines[index] = f"{indent}{name}: {text}"
            return "\n".join(lines) + "\n"
    raise AssertionError(f"{key} not in params.yaml")


def test_yaml_natural_numbers_are_kept(tmp_path):
    # An integer where a float is expected, and 1e-4 without a dot (YAML 1.2 and DVC read a float).
    path = tmp_path / "params.yaml"
    path.write_text(with_value("finetune.head_lr_mult", "2").replace("  lr: 0.01", "  lr: 1e-4"))
    params = load_params(path)
    assert params.head.lr == 1e-4 and params.finetune.head_lr_mult == 2.0


def test_a_duplicate_key_is_an_error_naming_it_and_its_lines(tmp_path):
    lines = REPO_PARAMS.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("  epochs: 40")) + 1  # head.epochs
    lines.insert(first, "  epochs: 4")
    text = "\n".join(lines) + "\n"
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match=rf"key 'epochs' is given twice \(lines {first} and {first + 1}\)"):
        load_params(path)
