"""Typed configuration: dataclasses in, YAML out.

One `Config` describes a whole distillation (and, in `search`, a whole search). It is loaded with
`yaml.safe_load`, overridden with dotted `--set a.b=c` strings, checked (unknown keys are errors that
name the key and list the valid ones), and saved next to every output so any run can be reproduced.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from kd.errors import ConfigError
from kd.typed import build, scalar_keys, set_dotted

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb limit: the default of data.max_image_pixels
# the held-out figures where lower is better (kd.selection; search.mode auto); the rest: higher is better
LOWER_IS_BETTER = frozenset({"val_balanced_log_loss", "val_balanced_accuracy_fold_std"})
IMBALANCE_METHODS = ("none", "inverse", "effective", "balanced_sampling", "logit_adjust")


@dataclass
class SplitSource:
    """One split on disk. `folder`: a directory of class folders. `csv`: a CSV of file name and label.

    In YAML a bare string is shorthand for `{path: ...}`.
    """
    path: str = ""          # folder: the directory of class folders; csv: the CSV file
    images: str = ""        # csv only: directory the file names are relative to (default: the CSV's folder)
    file_column: str = ""   # csv only: overrides data.file_column for this split
    label_column: str = ""  # csv only: overrides data.label_column for this split


@dataclass
class DataConfig:
    source: Literal["digits", "folder", "csv"] = "digits"  # digits (built in), folder of class folders, or csv
    train: SplitSource | None = None  # a single pool given as train is split into train/val/test
    val: SplitSource | None = None    # missing val/test splits are carved from train, stratified
    test: SplitSource | None = None   # the test split, evaluated once at the end (missing: carved from train)
    file_column: str = "file"         # csv: the column of image file names
    label_column: str = "label"       # csv: the column of labels
    classes: list[str] | None = None  # class order; default: sorted labels (integer labels index it)
    image_size: int = 32              # images are resized to image_size x image_size pixels
    val_fraction: float = 0.2         # the share of train carved out as validation where none is given
    test_fraction: float = 0.2        # the share of train carved out as test where none is given
    split_seed: int = 0               # the seed of the stratified carving (and of the folds)
    digits_minority: int = 8          # digits: this digit is the rare class, every other digit the common one
    on_bad_image: Literal["warn", "error"] = "warn"  # an image that cannot be decoded: skipped with a warning, or fatal
    groups: str = ""                  # column:NAME or pattern:REGEX: each image's subject, kept in one split/fold
    allow_leakage: bool = False       # the same image (or subject) in two splits is an error unless true
    allow_external_links: bool = False  # follow symlinks that point outside the dataset folder
    max_image_pixels: int = MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit
    cache_dir: str = "results/cache"  # decoded images, teacher weights and logits, student costs: reused across runs
    pipeline: Literal["memory", "stream"] = "memory"  # memory: decode once, keep in RAM; stream: read files each epoch
    workers: int = 0                  # decoding threads / stream workers; 0 = one per core, at most 8

    def check(self) -> None:
        require(self.image_size >= 8, "data.image_size", "must be at least 8")
        for key in ("val_fraction", "test_fraction"):
            require(0.0 < getattr(self, key) < 1.0, f"data.{key}", "must be between 0 and 1 (exclusive)")
        require(self.val_fraction + self.test_fraction < 0.9, "data.val_fraction",
                 "val_fraction + test_fraction must leave at least 10% for training")
        require(0 <= self.digits_minority <= 9, "data.digits_minority", "must be a digit 0-9")
        require(self.workers >= 0, "data.workers", "must be >= 0")
        require(self.max_image_pixels > 0, "data.max_image_pixels", "must be positive")
        if self.source != "digits":
            what = "a CSV file of file names and labels" if self.source == "csv" else "a folder of class folders"
            require(self.train is not None and bool(self.train.path), "data.train",
                     f"is required for source '{self.source}': {what} (e.g. --set data.train=PATH)")
        from kd.groups import check_spec
        check_spec(self.groups, self.source)
        if self.classes is not None:
            require(len(self.classes) >= 2, "data.classes", "needs at least two classes")
            require(len(set(self.classes)) == len(self.classes), "data.classes", "has duplicate names")


@dataclass
class AugmentConfig:
    """The reference projects' augmentations, batched on the training device.

    Views are a function of (seed, epoch, index)."""
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # random resized crop, area fraction
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # its aspect ratio range
    flip: float = 0.5          # horizontal flip probability
    rotation: float = 15.0     # max degrees either way
    brightness: float = 0.2    # colour jitter strengths, as torchvision's ColorJitter
    contrast: float = 0.2      # colour jitter: contrast strength
    saturation: float = 0.2    # colour jitter: saturation strength
    hue: float = 0.02          # colour jitter: hue shift, at most 0.5
    seed: int = 0              # the seed of the views (each a function of seed, epoch and image index)

    def check(self) -> None:
        for key in ("crop_scale", "crop_ratio"):
            lo_hi = getattr(self, key)
            require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], f"augment.{key}",
                     "must be [low, high] with 0 < low <= high")
        require(self.crop_scale[1] <= 1.0, "augment.crop_scale", "high must be <= 1")
        require(0.0 <= self.flip <= 1.0, "augment.flip", "is a probability in [0, 1]")
        require(0.0 <= self.rotation <= 180.0, "augment.rotation", "must be in [0, 180] degrees")
        for key in ("brightness", "contrast", "saturation"):
            require(0.0 <= getattr(self, key) < 1.0, f"augment.{key}", "must be in [0, 1)")
        require(0.0 <= self.hue <= 0.5, "augment.hue", "must be in [0, 0.5]")


@dataclass
class TrainConfig:
    epochs: int = 10            # passes over the training images
    batch_size: int = 64        # images per step
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd (with momentum) or adamw
    lr: float = 0.05            # the peak learning rate
    momentum: float = 0.9       # sgd's momentum
    weight_decay: float = 5e-4  # L2 weight decay (decoupled for adamw)
    schedule: Literal["cosine", "step", "constant"] = "cosine"  # how lr moves over the epochs
    warmup_epochs: int = 0      # epochs of linear warm-up before the schedule
    # cosine: the epochs after which lr, annealed to zero, restarts at its peak (SGDR, Loshchilov & Hutter 2017). A
    # search with ASHA sets them to its rungs (search.anneal_at_rungs), so a rung judges an annealed student.
    restarts: list[int] = field(default_factory=list)
    step_size: int = 7          # step schedule: multiply lr by gamma every step_size epochs
    gamma: float = 0.1          # step schedule: the factor
    grad_clip: float = 0.0      # max gradient norm; 0 = off
    seed: int = 0               # the seed of the weights' initialisation and the batch order
    device: str = "auto"        # auto | cpu | cuda | cuda:N
    # bf16 autocast: auto = on CUDA only; bf16 = on any device (the CPU too); off. An older config's true
    # reads as auto, false as off. Parameters stay float32 either way.
    amp: Literal["auto", "bf16", "off"] = "auto"
    # channels_last memory format: auto = CNNs, on any device; always = any model, any device; off. true/false as
    # amp ("always", not "on": YAML reads a bare on as true).
    channels_last: Literal["auto", "always", "off"] = "auto"
    compile: bool = False       # torch.compile the model
    eval_batch_size: int = 512  # images per forward pass when predicting
    tune_threshold: bool = True  # two classes: pick the decision threshold on validation

    def check(self, prefix: str = "train", min_epochs: int = 1) -> None:
        require(self.epochs >= min_epochs, f"{prefix}.epochs", f"must be >= {min_epochs}")
        require(self.batch_size >= 1, f"{prefix}.batch_size", "must be >= 1")
        require(self.eval_batch_size >= 1, f"{prefix}.eval_batch_size", "must be >= 1")
        require(self.lr > 0, f"{prefix}.lr", "must be > 0")
        require(0.0 <= self.momentum < 1.0, f"{prefix}.momentum", "must be in [0, 1)")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        require(0 <= self.warmup_epochs < max(self.epochs, 1), f"{prefix}.warmup_epochs", "must be >= 0 and < epochs")
        require(self.step_size >= 1, f"{prefix}.step_size", "must be >= 1")
        require(all(self.warmup_epochs < e < self.epochs for e in self.restarts)
                and self.restarts == sorted(set(self.restarts)), f"{prefix}.restarts",
                "must be increasing epochs between warmup_epochs and epochs")
        require(0 < self.gamma <= 1, f"{prefix}.gamma", "must be in (0, 1]")
        require(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be >= 0")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 f"{prefix}.device", "must be auto, cpu, cuda or cuda:N")


@dataclass
class ModelConfig:
    name: str = "test_resnet"          # a timm model name, or hf-hub:owner/repo[@revision], local-dir:PATH
    pretrained: bool | str = False  # false, true (the named weights, from the hub cache) or a local file
    drop_rate: float = 0.0             # dropout before the classifier

    def check(self, prefix: str) -> None:
        require(bool(self.name), f"{prefix}.name", "must name a timm model")
        require(0.0 <= self.drop_rate < 1.0, f"{prefix}.drop_rate", "must be in [0, 1)")


def _teacher_train() -> TrainConfig:
    return TrainConfig(epochs=8, lr=0.05)


@dataclass
class TeacherConfig(ModelConfig):
    name: str = "resnet18"       # a timm model name, or hf-hub:owner/repo[@revision], local-dir:PATH
    train: TrainConfig = field(default_factory=_teacher_train)  # fine-tuning; epochs: 0 uses the weights as given
    class_weighted: bool = True                                 # inverse-frequency weights in the teacher's CE

    def check(self, prefix: str = "teacher") -> None:
        super().check(prefix)
        self.train.check(f"{prefix}.train", min_epochs=0)
        require(self.train.epochs > 0 or self.pretrained is not False, f"{prefix}.train.epochs",
                 "is 0 (no fine-tuning), so teacher.pretrained must give weights (true or a file)")


@dataclass
class DistillConfig:
    """`alpha` weights the distillation term (the reference projects' and DeiT's convention); 1 - alpha weights the
    labels."""
    mode: Literal["soft", "hard"] = "soft"  # soft: KL to the teacher's softened probabilities; hard: CE to its argmax
    temperature: float = 4.0    # soft mode: the softening temperature T (the KL term is scaled by T^2)
    alpha: float = 0.5          # the weight of the teacher's term; 1 - alpha weighs the labels (0: labels only)

    def check(self) -> None:
        require(0.0 <= self.alpha <= 1.0, "distill.alpha", f"must be in [0, 1], got {self.alpha}")
        require(0.0 < self.temperature <= 100.0, "distill.temperature", "must be in (0, 100]")


@dataclass
class ImbalanceConfig:
    # how the rare classes are weighted: none, inverse frequency, effective number, balanced sampling, or logit
    # adjustment
    method: Literal["none", "inverse", "effective", "balanced_sampling", "logit_adjust"] = "none"
    beta: float = 0.999   # effective number of samples (Cui et al. 2019)
    tau: float = 1.0      # logit adjustment strength (Menon et al. 2021)

    def check(self) -> None:
        require(0.0 < self.beta < 1.0, "imbalance.beta", "must be in (0, 1)")
        require(0.0 <= self.tau <= 10.0, "imbalance.tau", "must be in [0, 10]")


@dataclass
class SchemeConfig:
    """The part of the `search` section the library reads: how a student is trained and judged (kd.schemes) and how a
    winner ships (kd.shipping). The rest of that section (trials, Ray, ASHA, loggers) is search.config's."""
    folds: int = 5                 # cross-validated trials over train + val pooled (1: the holdout split)
    # how the winner ships (kd.shipping): auto, the scheme's own way (a holdout's checkpoint, a refit); with folds
    # also its K fold students averaged (ensemble), or one student distilled from that average (distilled)
    final: Literal["auto", "checkpoint", "refit", "ensemble", "distilled"] = "auto"
    # two classes: the shipped model's decision rule (kd.shipping.Decision): auto, the tuned threshold only where it
    # judged better than argmax on held-out predictions it was cross-fitted over; or always one of them
    shipped_rule: Literal["auto", "threshold", "argmax"] = "auto"

    def check(self) -> None:
        require(self.folds >= 1, "search.folds", "must be >= 1 (1: the holdout validation split)")


C = TypeVar("C", bound="Config")
S = TypeVar("S")


@dataclass
class Config:
    """The library's config: what one distillation needs (search.config.Config adds a search's settings)."""
    name: str = "kd"            # the run's name: its folder under output_dir
    output_dir: str = "results"  # where runs are written
    data: DataConfig = field(default_factory=DataConfig)  # the images, their splits and where they are cached
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # the training views
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the large model, fine-tuned first
    student: ModelConfig = field(default_factory=ModelConfig)  # the small model distilled from it
    distill: DistillConfig = field(default_factory=DistillConfig)  # how the teacher's outputs enter the loss
    imbalance: ImbalanceConfig = field(default_factory=ImbalanceConfig)  # the rare classes' correction
    train: TrainConfig = field(default_factory=TrainConfig)  # the student's training
    search: SchemeConfig = field(default_factory=SchemeConfig)  # how a student is judged and a winner ships

    def check(self: C) -> C:
        require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
                 "must be a plain name (it becomes a folder under output_dir)")
        self.data.check()
        self.augment.check()
        self.teacher.check()
        self.student.check("student")
        self.distill.check()
        self.imbalance.check()
        self.train.check()
        self.search.check()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    @classmethod
    def upgraded(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """An earlier version's config, as plain data, in this version's terms (before its keys are checked)."""
        return raw

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def updated(self: C, values: dict[str, Any], source: str = "override") -> C:
        """A new, checked config of this type with dotted keys replaced (used for --set and for searched values)."""
        raw = self.to_dict()
        for dotted, value in values.items():
            set_dotted(type(self), raw, dotted, value, source)
        return from_dict(raw, source, type(self))


# --------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type[C] = Config) -> C:  # type: ignore[assignment]
    """Read a YAML config (None: the defaults), apply `a.b=c` overrides, check everything. `schema`: the config type
    (search.config.Config adds the search's own settings)."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    given: dict[str, str] = {}  # key -> the --set that gave its value
    for item in overrides or []:
        key, sep, text_value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. distill.temperature=4), got '{item}'")
        try:
            value = yaml.safe_load(text_value) if text_value.strip() else ""
        except yaml.YAMLError:
            value = text_value
        set_dotted(schema, raw, key.strip(), value, "--set")
        given[key.strip()] = item
    try:
        return from_dict(raw, source, schema)
    except ConfigError as e:  # a value --set gave is blamed on --set, not on the file it overrode
        text = str(e).removeprefix(f"{source}: ")
        blamed = next((item for key, item in given.items() if text.startswith((f"'{key}'", f"{key} "))), None)
        if blamed is None:
            raise
        raise ConfigError(f"--set {blamed}: {text}") from None


def from_dict(raw: dict[str, Any], source: str = "config", schema: type[C] = Config) -> C:  # type: ignore[assignment]
    """Build and check a config of type `schema` from plain data, naming `source` in every error."""
    cfg: C = build(schema, schema.upgraded(raw), "", source)
    try:
        return cfg.check()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's plain data: a mapping of sections (an empty file: none), or an error naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, not a {type(loaded).__name__}")
    return loaded


def section(raw: dict[str, Any], name: str, cls: type[S], source: str) -> S:
    """One section of a config's plain data as its dataclass (its keys checked), the rest of the config unread."""
    value: S = build(cls, raw.get(name) or {}, f"{name}.", source)
    return value


def save_config(cfg: Config, path: str | Path) -> None:
    from kd.files import atomic_write_text  # torch's: a config is read without loading it
    atomic_write_text(Path(path), cfg.to_yaml())


def config_keys(schema: type[Config] = Config) -> list[str]:
    """Every dotted scalar key of the config (what `--set` and `search.space` accept)."""
    return scalar_keys(schema)


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {message}")
