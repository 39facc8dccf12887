"""Hyper-parameter tuning: an Optuna study over the search space in params.yaml's `tune:` section.

Each trial draws the searched keys (`head.lr`, `finetune.lr`, `freeze_layers`...), trains them on top of
the rest of params.yaml with the train stage's own recipe (transfer.train.recipe: a head-only trial is a
linear probe on the cached features, under a second on CPU; a fine-tuning trial reports its val metric
every epoch, and the pruner stops it when it lags) and is scored on the validation split. The test split
is never read: it stays an unbiased estimate for the pipeline's evaluate stage.

Several workers share one study through Optuna's storage: a journal file (any shared file system) or a
database URL. The study's trial budget (`n_trials`) counts every worker's trials. Each trial is one MLflow
child run under the study's parent run (transfer.tracking.StudyTracker), whichever worker ran it.

The best params go to data/tune/<study>/best.json, with the `dvc exp run -S ...` command that trains
them through the pipeline (`transfer tune --apply` runs it), and the study's plots next to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from transfer.pipeline.errors import UserError
from transfer.pipeline.params import Params, SearchDimension, TuneParams, flatten, parse_params

logger = logging.getLogger(__name__)

TUNE_DIR = Path("data/tune")  # data/tune/<study>/: best.json, trials.csv, plots
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the MLflow parent run every worker logs under
IDENTITY_ATTR = "identity"  # study user attr: what must match for a worker to join the study
TRAIN_KEYS = ("backbone", "features.layers", "freeze_layers", "head", "finetune", "seed", "device")  # train stage
PARENT_WAIT_S = 60.0  # how long a joining worker waits for the study's creator to record the parent run


class TuneError(UserError, ValueError):
    """A study that cannot start or be joined as configured (storage, name, search space, data)."""


class TrialTracker(Protocol):
    """Where trials are recorded (transfer.tracking.StudyTracker for MLflow)."""

    parent_run_id: str | None

    def create_parent(self, settings: dict[str, Any], tags: dict[str, str]) -> str: ...
    def start_trial(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> str: ...
    def log_trial_epoch(self, run_id: str, row: dict[str, Any]) -> None: ...
    def end_trial(self, run_id: str, state: str, value: float | None) -> None: ...
    def log_study(self, metrics: dict[str, float], best: dict[str, Any], artifacts: list[Path]) -> None: ...


# --- Search space and trial params --------------------------------------------------------------


def suggest(trial, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """Draw every key of the search space for an Optuna trial."""
    values: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(dim.choices))
        elif dim.type == "int":
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            values[key] = trial.suggest_float(
                key, float(dim.low), float(dim.high), step=dim.step, log=dim.type == "loguniform"
            )
    return values


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """params with dotted keys replaced (`head.lr` -> params.head.lr), validated against the schema again."""
    raw = params.model_dump()
    for key, value in overrides.items():
        *sections, name = key.split(".")
        target = raw
        for section in sections:
            target = target[section]
        target[name] = value
    return parse_params(raw, source="the trial's params")


def train_params(params: Params) -> dict[str, Any]:
    """The params the train stage reads, flattened as in its MLflow run (comparable side by side in the UI)."""
    return {
        key: value
        for key, value in flatten(params).items()
        if any(key == prefix or key.startswith(prefix + ".") for prefix in TRAIN_KEYS)
    }


def format_override(key: str, value: Any) -> str:
    """`key=value` as `dvc exp run -S` parses it back to the same value (floats at full precision)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"  # YAML 1.1 (PyYAML) reads 1e-05 as a string, 1.0e-05 as a float
    else:
        text = str(value)
    return f"{key}={text}"


def exp_run_command(overrides: dict[str, Any]) -> str:
    """The `dvc exp run` command that trains these values through the pipeline (test metrics included)."""
    return " ".join(["dvc exp run"] + [f"-S {shlex.quote(format_override(k, v))}" for k, v in overrides.items()])


# --- The study ----------------------------------------------------------------------------------


def baseline_values(params: Params) -> dict[str, Any]:
    """params.yaml's own values of the searched keys, where the space can draw them."""
    current = flatten(params)
    return {key: current[key] for key, dim in params.tune.space.items() if dim.contains(current[key])}


def storage_for(spec: str | None, root: Path):
    """None (in memory), a database URL as given, or a journal file (relative paths: to the repository root)."""
    import optuna

    if spec is None:
        return None
    if "://" in spec:
        return spec  # RDB: postgresql://, mysql+pymysql://, sqlite:///...
    path = Path(spec) if Path(spec).is_absolute() else root / spec
    path.parent.mkdir(parents=True, exist_ok=True)
    # JournalFileBackend locks by symlink by default, which works on NFS too: workers on several machines.
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def make_sampler(name: str, seed: int):
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a running trial counts as a bad result, so parallel workers do not pile on one point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(name: str, startup_trials: int, warmup_epochs: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs), max_resource="auto")
    return optuna.pruners.NopPruner()


def study_identity(params: Params, data_hash: str) -> dict[str, Any]:
    """What every worker of a study must agree on: the metric, the space, the fixed params and the data."""
    fixed = {k: v for k, v in train_params(params).items() if k not in params.tune.space}
    digest = hashlib.sha256(json.dumps({"fixed": fixed, "data": data_hash}, sort_keys=True, default=str).encode())
    return {
        "metric": params.tune.metric,
        "direction": params.tune.direction,
        "space": {k: v.model_dump(exclude_defaults=True) for k, v in params.tune.space.items()},
        "params_and_data": digest.hexdigest(),
    }


def open_study(tune: TuneParams, storage, sampler_seed: int):
    """Create the study, or join it when another worker (or an earlier run) created it. Returns (study, created)."""
    import optuna

    sampler = make_sampler(tune.sampler, sampler_seed)
    pruner = make_pruner(tune.pruner, tune.pruner_startup_trials, tune.pruner_warmup_epochs)
    try:
        # Creation is atomic in every storage: of several workers starting together, exactly one creates.
        return optuna.create_study(
            storage=storage, sampler=sampler, pruner=pruner, study_name=tune.study_name, direction=tune.direction
        ), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=tune.study_name, storage=storage, sampler=sampler, pruner=pruner), False


def check_joinable(study, identity: dict[str, Any], storage_text: str) -> None:
    recorded = study.user_attrs.get(IDENTITY_ATTR)
    if recorded is None:
        return
    different = sorted(key for key in identity if recorded.get(key) != json.loads(json.dumps(identity[key])))
    if different:
        raise TuneError(
            f"study {study.study_name!r} in {storage_text} was started with another {', '.join(different)} "
            f"(params.yaml or data differ from its workers'): use another tune.study_name, or the "
            f"params.yaml and data of the study's other workers"
        )


def wait_for_parent_run(study, timeout_s: float = PARENT_WAIT_S) -> str | None:
    """The parent run id the study's creator records right after creating it (None after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id or time.monotonic() >= deadline:
            return run_id
        time.sleep(0.5)


def finished_trials(study) -> list:
    """The trials that count against the budget: every finished one (a failed trial also spent it)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return study.get_trials(deepcopy=False, states=states)


def best_trial(study):
    """The best complete trial, or None when none completed."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if complete else None


# --- Running trials -----------------------------------------------------------------------------


@dataclass
class TuneSummary:
    study_name: str
    best_value: float | None
    best_trial: int | None
    best_params: dict[str, Any]
    complete: int
    pruned: int
    failed: int
    ran_here: int  # trials this worker ran
    wall_s: float
    command: str | None
    study: Any = field(default=None, repr=False)  # the optuna.Study


def run_trial(study, trial, base: Params, inputs, tracker: TrialTracker | None, tags: dict[str, str]) -> None:
    """Train one trial and tell the study its outcome; its MLflow child run mirrors every step."""
    import optuna

    from transfer.train.recipe import train_and_score

    run_id: str | None = None
    last_value: list[float] = []

    def on_epoch(row: dict) -> None:
        if tracker:
            tracker.log_trial_epoch(run_id, row)

    def on_score(value: float, step: int) -> None:
        last_value[:] = [value]
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"val {base.tune.metric} {value:.4f} after fine-tuning epoch {step}")

    try:
        params = with_overrides(base, suggest(trial, base.tune.space))
        run_id = tracker.start_trial(trial.number, train_params(params), tags) if tracker else None
        outcome = train_and_score(params, inputs, base.tune.metric, on_epoch=on_epoch, on_score=on_score)
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        if tracker:
            tracker.end_trial(run_id, "pruned", last_value[0] if last_value else None)
        return
    except BaseException:  # a bug, bad params or Ctrl-C: the trial fails in both records, and the study stops
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if tracker and run_id:
            tracker.end_trial(run_id, "failed", None)
        raise
    state = "failed" if math.isnan(outcome.value) else "complete"
    study.tell(
        trial,
        outcome.value if state == "complete" else None,
        state=optuna.trial.TrialState.COMPLETE if state == "complete" else optuna.trial.TrialState.FAIL,
    )
    if tracker:
        tracker.end_trial(run_id, state, outcome.value)


def check_freeze_layers(tune: TuneParams, params: Params, inputs) -> None:
    """Every freeze_layers value the space can draw is a layer-group count of this backbone."""
    dim = tune.space.get("freeze_layers")
    if dim is None:
        return
    from transfer.models.groups import LayerGroupError, check_freeze_layers

    loaded = inputs.backbone(params)
    groups = len(loaded.backbone.group_names)
    values = dim.choices if dim.type == "categorical" else [int(dim.low), int(dim.high)]
    bad = []
    for value in values:
        try:
            if isinstance(value, int):  # a group count ('all' fits every backbone)
                check_freeze_layers(loaded.backbone, value)
        except LayerGroupError:
            bad.append(value)
    if bad:
        raise TuneError(
            f"tune.space.freeze_layers: {bad} outside 0..{groups}, the layer groups of "
            f"the backbone ({', '.join(loaded.backbone.group_names)})"
        )


def tune(
    params: Params,
    inputs,
    root: Path,
    tracker: TrialTracker | None = None,
    n_trials: int | None = None,
    timeout_min: float | None = None,
    worker: int = 0,
    tags: dict[str, str] | None = None,
    progress: bool = True,
) -> TuneSummary:
    """Run trials of params.tune's study until its budget is spent; returns the study's summary.

    `n_trials` / `timeout_min` override params.tune's. `worker` offsets the sampler's seed: workers sharing
    a study need distinct values, or they propose the same first trials.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError
    from tqdm import tqdm

    tune_params = params.tune
    n_trials = n_trials if n_trials is not None else tune_params.n_trials
    timeout_min = timeout_min if timeout_min is not None else tune_params.timeout_min
    tags = tags or {}
    check_freeze_layers(tune_params, params, inputs)
    storage = storage_for(tune_params.storage, root)
    storage_text = tune_params.storage or "memory"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bar replaces a log line per trial
    try:
        study, created = open_study(tune_params, storage, tune_params.seed + worker)
    except (ValueError, RuntimeError, ImportError, SQLAlchemyError) as exc:  # bad URL, no driver, no server
        raise TuneError(f"tune.storage {storage_text}: cannot open study {tune_params.study_name!r}: {exc}") from None
    identity = study_identity(params, inputs.data_hash)
    tags = {**tags, "tune.worker": f"{socket.gethostname()}:{os.getpid()}"}  # which machine ran the trial
    if created:
        study.set_user_attr(IDENTITY_ATTR, identity)
        baseline = baseline_values(params)
        if tune_params.baseline_first and baseline:
            study.enqueue_trial(baseline)
        if tracker:
            settings = {k: v for k, v in flatten(params).items() if k.startswith("tune.") and k != "tune.space"}
            settings.update(
                {
                    f"tune.space.{k}": json.dumps(v.model_dump(exclude_defaults=True))
                    for k, v in tune_params.space.items()
                }
            )
            study.set_user_attr(PARENT_RUN_ATTR, tracker.create_parent(settings, tags))
    else:
        check_joinable(study, identity, storage_text)
        if tracker:
            tracker.parent_run_id = wait_for_parent_run(study)
            if tracker.parent_run_id is None:  # its creator died before recording it: this worker takes over
                study.set_user_attr(PARENT_RUN_ATTR, tracker.create_parent({}, tags))

    start = time.monotonic()
    ran = 0
    bar = tqdm(
        total=n_trials,
        initial=len(finished_trials(study)),
        desc=f"tune {tune_params.study_name}",
        unit="trial",
        disable=not progress,
    )
    try:
        while True:
            done = len(finished_trials(study))
            bar.update(done - bar.n)
            best = best_trial(study)
            if best is not None:
                bar.set_postfix_str(f"best {tune_params.metric} {best.value:.4f} (trial {best.number})")
            # The budget counts every worker's trials: with W workers it may end up to W-1 over n_trials.
            if n_trials is not None and done >= n_trials:
                break
            if timeout_min is not None and time.monotonic() - start >= 60 * timeout_min:
                break
            trial = study.ask()
            run_trial(study, trial, params, inputs, tracker, tags)
            ran += 1
    finally:
        bar.close()
    return summarise(study, ran, time.monotonic() - start)


def summarise(study, ran: int, wall_s: float) -> TuneSummary:
    import optuna

    counts = {state: len(study.get_trials(deepcopy=False, states=(state,))) for state in optuna.trial.TrialState}
    best = best_trial(study)
    return TuneSummary(
        study_name=study.study_name,
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
        best_params=dict(best.params) if best else {},
        complete=counts[optuna.trial.TrialState.COMPLETE],
        pruned=counts[optuna.trial.TrialState.PRUNED],
        failed=counts[optuna.trial.TrialState.FAIL],
        ran_here=ran,
        wall_s=wall_s,
        command=exp_run_command(best.params) if best else None,
        study=study,
    )


# --- Outputs ------------------------------------------------------------------------------------


def record_study(summary: TuneSummary, tune_params: TuneParams, out_dir: Path, tracker: TrialTracker | None) -> None:
    """The study's files in out_dir and, with a tracker, its summary, best params and plots on the parent run."""
    artifacts = write_outputs(summary, tune_params, out_dir)
    if tracker:
        metrics = {
            "trials_complete": summary.complete,
            "trials_pruned": summary.pruned,
            "trials_failed": summary.failed,
        }
        if summary.best_value is not None:
            metrics["best_value"] = summary.best_value
        tracker.log_study(metrics, summary.best_params, artifacts)


def write_outputs(summary: TuneSummary, tune_params: TuneParams, out_dir: Path) -> list[Path]:
    """best.json, trials.csv and the study's plots in out_dir; returns the files written."""
    from transfer.pipeline.files import write_csv, write_json

    study, written = summary.study, []
    if summary.best_trial is not None:
        write_json(
            out_dir / "best.json",
            {
                "study": summary.study_name,
                "storage": tune_params.storage,
                "metric": tune_params.metric,
                "direction": tune_params.direction,
                "best_value": summary.best_value,
                "best_trial": summary.best_trial,
                "params": summary.best_params,
                "command": summary.command,
                "trials": {"complete": summary.complete, "pruned": summary.pruned, "failed": summary.failed},
            },
        )
        written.append(out_dir / "best.json")
    # No timestamps or durations: the same seeded study writes the same file.
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params"))
    write_csv(out_dir / "trials.csv", frame)
    written.append(out_dir / "trials.csv")
    return written + save_plots(study, out_dir)


def save_plots(study, out_dir: Path) -> list[Path]:
    """Optuna's optimisation history, parameter importances and (fine-tuning) intermediate values, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    from transfer.pipeline.files import atomic_path

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots: dict[str, Callable] = {"optimization_history": optuna_plots.plot_optimization_history}
    if len(complete) >= 2 and len(study.best_trial.params) >= 1:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: the same study, the same plot
        plots["param_importances"] = lambda s: optuna_plots.plot_param_importances(s, evaluator=evaluator)
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate_values"] = optuna_plots.plot_intermediate_values
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in plots.items():
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances of parameters that never varied
                logger.warning("tune: no %s plot: %s", name, exc)
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            path = out_dir / f"{name}.png"
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
            plt.close(figure)
            written.append(path)
    return written
