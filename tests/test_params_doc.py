"""The README's params reference is generated from the schema: the two never drift."""

from pathlib import Path

from transfer.pipeline.params import flatten, load_params
from transfer.pipeline.params_doc import main, reference_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_params_reference_matches_the_schema():
    code = main(["--readme", str(ROOT / "README.md"), "--dvc-yaml", str(ROOT / "dvc.yaml"), "--check"])
    assert code == 0, "README.md's params reference is stale: run `python -m transfer.pipeline.params_doc`"


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
