"""The whole config of a search: the library's sections (kd.config) and the `search` section's own settings.

kd/ knows only the part of the `search` section it reads (kd.config.SchemeConfig: folds, how a winner ships); the
trials, Ray's resources, ASHA, the loggers and the storage are settings of this layer, typed here. Every reader in
search/ loads configs through `load_config` here, so an unknown key is still an error naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kd import config as library
from kd.config import IMBALANCE_METHODS, LOWER_IS_BETTER, SchemeConfig, require

LOGGERS = ("tensorboard", "mlflow")  # Ray Tune's logger callbacks a search can turn on (search.tracking)


def default_space() -> dict[str, dict[str, Any]]:
    """The search space used when a config declares none: everything the reference projects set by hand."""
    return {
        "distill.mode": {"type": "choice", "values": ["soft", "hard"]},
        "distill.temperature": {"type": "loguniform", "low": 1.0, "high": 20.0, "when": {"distill.mode": "soft"}},
        "distill.alpha": {"type": "uniform", "low": 0.0, "high": 1.0},
        "train.lr": {"type": "loguniform", "low": 1e-3, "high": 0.3},
        "imbalance.method": {"type": "choice", "values": list(IMBALANCE_METHODS)},
        "imbalance.beta": {"type": "uniform", "low": 0.9, "high": 0.9999, "when": {"imbalance.method": "effective"}},
        "imbalance.tau": {"type": "uniform", "low": 0.25, "high": 2.0, "when": {"imbalance.method": "logit_adjust"}},
    }


COSTS = ("student_params", "student_mflops", "student_latency_ms")  # what a student costs, lower is better


@dataclass
class SearchConfig(SchemeConfig):
    """The `search` section: the library's part (folds, final: kd.config.SchemeConfig) and the search's own."""
    num_samples: int = 16          # trials (the hand-picked points among them)
    metric: str = "val_auc"        # the ranking figure bench/quality.py chose (bench/README.md: which figure ranks)
    mode: Literal["auto", "max", "min"] = "auto"  # auto: min for a loss (kd.selection.LOWER_IS_BETTER), else max
    objectives: list[str] = field(default_factory=list)  # [metric, a cost, ...]: a multi-objective search
    # asha: stop weak trials early; none: every trial runs all epochs; auto: asha, but none in a multi-objective
    # search (ASHA judges on accuracy alone and would stop the cheap students before they reach the front)
    scheduler: Literal["auto", "asha", "none"] = "auto"
    grace_period: int = 2          # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2      # ASHA: the share of trials kept at each rung is 1 / reduction_factor
    # ASHA with a cosine schedule: lr anneals to zero at each rung and restarts (train.restarts set to the rungs),
    # so a rung judges a student as it will be judged at the end, not one whose lr has not come down yet
    anneal_at_rungs: bool = True
    max_concurrent: int = 0        # 0 = as many as the resources allow
    gpus_per_trial: float = 0.25   # fractions pack several trials on one GPU; ignored where there is no GPU
    cpus_per_trial: float = 1.0    # CPUs a trial holds (torch uses as many threads)
    seed: int = 0                  # the seed of Optuna's sampler
    space: dict[str, Any] = field(default_factory=default_space)  # the searched keys: {key: {type, low, high | values}}
    points: list[dict[str, Any]] = field(default_factory=list)  # known configs to try first
    rerank: int = 3                # the top trials (and the hand-picked points) retrained with further seeds
    max_params: int = 0            # a budget the exported student must fit: parameters (0: none) ...
    max_latency_ms: float = 0.0    # ... and latency at batch 1 as measured in its trial (0: none)
    confirm_seeds: int = 3         # how many further seeds each of them is retrained with
    judge_seeds: int = 2           # seeds more the winner and the hand-picked points train with, to judge them
    max_failures: int = 1          # retries of a failed trial
    checkpoint_every: int = 1      # epochs between trial checkpoints (the last epoch always is one)
    storage: str = ""              # shared path or s3:// for clusters; default: the run directory
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # also: mlflow (Ray Tune's callbacks)
    mlflow_uri: str = ""           # MLflow tracking store: a URI, or a folder for a SQLite store; default: the run's

    @property
    def direction(self) -> Literal["max", "min"]:
        """`mode`, with auto resolved: whether a higher `metric` is better."""
        if self.mode != "auto":
            return self.mode
        return "min" if self.metric in LOWER_IS_BETTER else "max"

    def direction_of(self, name: str) -> Literal["max", "min"]:
        """Whether a higher `name` is better: the metric's `direction`; min for a cost or a loss, else max."""
        if name == self.metric:
            return self.direction
        return "min" if name in COSTS or name in LOWER_IS_BETTER else "max"

    @property
    def stops_early(self) -> bool:
        """Whether ASHA stops weak trials: `scheduler` with auto resolved."""
        return self.scheduler == "asha" or (self.scheduler == "auto" and not self.objectives)

    @property
    def directions(self) -> list[Literal["max", "min"]]:
        return [self.direction_of(name) for name in self.objectives]

    def check(self) -> None:
        super().check()
        from kd.schemes import Scheme  # torch's: imported only once the rest of the config is known good
        Scheme.with_folds(self.folds).way(self.final)  # what its scheme can ship
        require(self.num_samples >= 1, "search.num_samples", "must be >= 1")
        if self.objectives:
            require(len(self.objectives) >= 2 and len(set(self.objectives)) == len(self.objectives),
                     "search.objectives", "must name two or more different figures (or none: a single-objective "
                     "search on search.metric)")
            require(self.objectives[0] == self.metric, "search.objectives",
                     f"starts with {self.objectives[0]!r}, but search.metric is {self.metric!r}: the first objective "
                     "is the figure ASHA stops on and the re-ranking ranks by, so it must be search.metric (set "
                     f"search.metric: {self.objectives[0]}, or put {self.metric} first)")
            require(any(name in COSTS for name in self.objectives), "search.objectives",
                     f"names no cost: add one of {', '.join(COSTS)}")
        require(self.mode == "auto" or (self.mode == "min") == (self.metric in LOWER_IS_BETTER), "search.mode",
                 f"is {self.mode}, but a {'lower' if self.metric in LOWER_IS_BETTER else 'higher'} "
                 f"{self.metric} is better (auto picks the direction)")
        require(self.grace_period >= 1, "search.grace_period", "must be >= 1")
        require(self.reduction_factor >= 2, "search.reduction_factor", "must be >= 2")
        require(self.max_concurrent >= 0, "search.max_concurrent", "must be >= 0")
        require(self.gpus_per_trial >= 0, "search.gpus_per_trial", "must be >= 0")
        require(self.cpus_per_trial > 0, "search.cpus_per_trial", "must be > 0")
        require(self.confirm_seeds >= 0, "search.confirm_seeds", "must be >= 0")
        require(self.judge_seeds >= 0, "search.judge_seeds", "must be >= 0 (0: the winner is not judged)")
        require(self.rerank >= 1, "search.rerank", "must be >= 1")
        require(self.max_params >= 0, "search.max_params", "must be >= 0 (0: no budget)")
        require(self.max_latency_ms >= 0, "search.max_latency_ms", "must be >= 0 (0: no budget)")
        require(self.max_failures >= 0, "search.max_failures", "must be >= 0")
        require(self.checkpoint_every >= 1, "search.checkpoint_every", "must be >= 1")
        require(len(self.space) > 0, "search.space", "is empty: name at least one key to search")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        require(not unknown, "search.loggers", f"names {', '.join(map(repr, unknown))}: the loggers are "
                 f"{', '.join(LOGGERS)}")


@dataclass
class Config(library.Config):
    """A search's config: a distillation's (kd.config.Config) with the search's settings in `search`."""
    search: SearchConfig = field(default_factory=SearchConfig)  # the trials, their judging, Ray and the winner

    @classmethod
    def upgraded(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Earlier versions wrote their default `search.final: refit` into every config, a holdout's too, where it
        shipped the trial's checkpoint: read as that (`checkpoint`), so their run directories still load."""
        search = raw.get("search")
        if isinstance(search, dict) and search.get("final") == "refit" and search.get("folds") == 1:
            raw = {**raw, "search": {**search, "final": "checkpoint"}}
        return raw

    @property
    def ships(self) -> str:
        """The way its winner ships, `search.final` resolved (auto: the scheme's own)."""
        from kd.schemes import Scheme
        return str(Scheme.of(self).way(self.search.final))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A search's config from YAML (None: the defaults) and `a.b=c` overrides, checked (kd.config.load_config)."""
    return library.load_config(path, overrides, Config)


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    return library.from_dict(raw, source, Config)


def config_keys() -> list[str]:
    """Every dotted scalar key of a search's config (what `--set` and `search.space` accept)."""
    return library.config_keys(Config)
