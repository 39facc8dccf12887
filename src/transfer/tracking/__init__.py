"""Everything MLflow: the one package that imports it, a module per job:

    store     where runs go: the store (SQLite under mlruns/, or a server), experiments, the runs view
    runs      a pipeline run: name, tags, opening and reopening it, EpochLog and what the stages log
    models    the classifier as a pyfunc (images in), the torch module, a scikit-learn head, the registry
              (`promote_best`), reading a logged model back (`resolve_model`)
    tuning    one parent run per Optuna study, a child run per trial (StudyTracker)
    lr_find   the LR finder's sweep as a run

The package exports each module's public names: `from transfer import tracking; tracking.log_metrics(...)`.

The store is a SQLite database plus an artifact folder under `mlruns/` at the repository root. DVC runs
queued and `--temp` experiments in a temporary copy of the repository and sets `DVC_ROOT` to the real
one, so the root is taken from `DVC_ROOT` first: every run lands in the same store, whichever copy ran
it. Several queue workers write to that SQLite file at once; a file lock serialises the one-time schema
creation and a generous SQLite busy timeout makes concurrent writers wait instead of failing.

A pipeline run is one MLflow run: the train stage opens it (params, tags, per-epoch metrics, model) and
records its id next to the model; the evaluate stage reopens that run to add the test metrics.
The model is logged as a pyfunc that takes images (ImageClassifierModel, registered in the model
registry) and as the raw PyTorch module; `promote_best` moves a registry alias to the best run.

MLFLOW_TRACKING_URI=http://... sends everything to a team server (`make server-mlflow`) instead; the server
then chooses where artifacts go. Every run has a name (the DVC experiment's, or one read from its params),
and the experiment carries a shared view of the runs table (`runs_view_url`) that opens on the key params
and metrics rather than on MLflow's 100-odd columns.
"""

from transfer.tracking.lr_find import (
    log_lr_find,
)
from transfer.tracking.models import (
    CLASSIFIER_ARTIFACT,
    MLFLOW_SCHEMES,
    PYFUNC_MODEL_NAME,
    PYTORCH_MODEL_NAME,
    ImageClassifierModel,
    download_classifier,
    log_feature_head,
    log_model,
    log_trained_model,
    promote_best,
    register_model,
    resolve_model,
)
from transfer.tracking.runs import (
    MODEL_DIGEST_TAG,
    EpochLog,
    epoch_metrics,
    git_commit,
    log_artifacts,
    log_evaluation,
    log_key_metrics,
    log_metric_batches,
    log_metrics,
    log_tags,
    model_run,
    readable_run_name,
    reopen_run,
    run_name,
    run_tags,
    stage_training_run,
    training_run,
)
from transfer.tracking.store import (
    EXPERIMENT_KIND,
    KEY_METRICS,
    KEY_PARAMS,
    KEY_TAGS,
    RUNS_VIEW_KEY,
    SQLITE_BUSY_TIMEOUT,
    TrackingError,
    experiment_tags,
    find_runs,
    point_at_store,
    repository_root,
    runs_view_url,
    store_dir,
    tracking_uri,
    use_experiment,
)
from transfer.tracking.tuning import (
    TRIAL_STATUS,
    StudyTracker,
    find_study_runs,
)

__all__ = [
    "SQLITE_BUSY_TIMEOUT",
    "KEY_METRICS",
    "KEY_PARAMS",
    "KEY_TAGS",
    "EXPERIMENT_KIND",
    "RUNS_VIEW_KEY",
    "repository_root",
    "store_dir",
    "tracking_uri",
    "experiment_tags",
    "runs_view_url",
    "point_at_store",
    "use_experiment",
    "TrackingError",
    "find_runs",
    "git_commit",
    "run_tags",
    "readable_run_name",
    "run_name",
    "training_run",
    "reopen_run",
    "MODEL_DIGEST_TAG",
    "model_run",
    "epoch_metrics",
    "log_metric_batches",
    "EpochLog",
    "log_metrics",
    "log_key_metrics",
    "log_artifacts",
    "log_evaluation",
    "log_tags",
    "stage_training_run",
    "CLASSIFIER_ARTIFACT",
    "PYFUNC_MODEL_NAME",
    "PYTORCH_MODEL_NAME",
    "ImageClassifierModel",
    "log_model",
    "register_model",
    "download_classifier",
    "promote_best",
    "log_feature_head",
    "log_trained_model",
    "MLFLOW_SCHEMES",
    "resolve_model",
    "TRIAL_STATUS",
    "StudyTracker",
    "find_study_runs",
    "log_lr_find",
]
