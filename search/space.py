"""The search space: declared in the config's `search.space`, sampled by Optuna define-by-run.

Each entry names a dotted config key and a distribution:

    distill.temperature: {type: loguniform, low: 1, high: 20, when: {distill.mode: soft}}
    distill.mode:        {type: choice, values: [soft, hard]}
    train.batch_size:    {type: int, low: 16, high: 128, log: true}

`when` makes a parameter conditional on another searched (or fixed) key, so temperature is never
sampled for hard distillation. The define-by-run function only suggests values; no computation happens
in it (as Ray's optuna_define_by_run_example does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kd.errors import ConfigError, UserError
from kd.hub import pretrained_file, source_of
from kd.models import check_models
from search.config import Config, config_keys

TYPES = ("uniform", "loguniform", "int", "choice")
SPEC_KEYS = {"type", "low", "high", "values", "log", "when"}
SEARCHABLE = ("student.", "distill.", "imbalance.", "train.")
FIXED_PER_SEARCH = {  # keys a trial cannot change: they shape what the search prepares once for every trial
    "data": "the dataset is decoded and split once per search",
    "augment": "the teacher's logits are cached for the views of one augmentation stream",
    "teacher": "the teacher is fine-tuned and its logits computed once per search",
    "train.epochs": "it is every trial's maximum, the budget ASHA divides (set it, and search the rest)",
    "train.device": "Ray places trials on devices (search.gpus_per_trial)",
    "train.tune_threshold": "every trial is judged by the one decision rule of the search (kd.selection)",
}


@dataclass
class Param:
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    values: list[Any] = field(default_factory=list)
    log: bool = False
    when: dict[str, list[Any]] = field(default_factory=dict)

    def active(self, sampled: dict[str, Any], base: Config) -> bool:
        """Whether this parameter applies, given the values sampled so far (or fixed in the config)."""
        return all((sampled[k] if k in sampled else base.get(k)) in allowed for k, allowed in self.when.items())

    def bounds(self) -> tuple[float | int, float | int]:
        """`low` and `high` of a numeric parameter (parse_space sets both for every type but choice)."""
        if self.low is None or self.high is None:
            raise TypeError(f"{self.key}: a {self.type} parameter needs low and high")
        return self.low, self.high

    def suggest(self, trial: Any) -> Any:
        if self.type == "choice":
            return trial.suggest_categorical(self.key, self.values)
        low, high = self.bounds()
        if self.type == "int":
            return trial.suggest_int(self.key, int(low), int(high), log=self.log)
        return trial.suggest_float(self.key, float(low), float(high), log=self.type == "loguniform")


def parse_space(cfg: Config) -> list[Param]:
    """Check `search.space` against the config and order it so conditions come before what they guard."""
    space = cfg.search.space
    valid = set(config_keys())
    params = []
    for key, spec in space.items():
        where = f"search.space['{key}']"
        if key not in valid:
            raise ConfigError(f"{where}: '{key}' is not a config key (e.g. distill.temperature, train.lr, "
                              "imbalance.method)")
        why = FIXED_PER_SEARCH.get(key) or FIXED_PER_SEARCH.get(key.split(".")[0])
        if why or not key.startswith(SEARCHABLE):
            raise ConfigError(f"{where}: '{key}' cannot be searched: {why or 'it is not a training setting'}. "
                              f"Searchable keys start with {', '.join(SEARCHABLE)}; run one search per value instead")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a mapping such as {{type: uniform, low: 0, high: 1}}, got {spec!r}")
        unknown = set(spec) - SPEC_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown field {', '.join(sorted(unknown))}; "
                              f"valid: {', '.join(sorted(SPEC_KEYS))}")
        kind = spec.get("type")
        if kind not in TYPES:
            raise ConfigError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
        when = {}
        for cond_key, allowed in (spec.get("when") or {}).items():
            if cond_key not in valid:
                raise ConfigError(f"{where}: condition on unknown key '{cond_key}'")
            when[cond_key] = allowed if isinstance(allowed, list) else [allowed]
        param = Param(key, kind, when=when, log=bool(spec.get("log", False)))
        if kind == "choice":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: a choice needs a non-empty list of values")
            param.values = values
            for v in values:
                _check_value(cfg, key, v, where)
        else:
            try:
                param.low, param.high = _number(spec.get("low")), _number(spec.get("high"))
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {kind} needs numeric low and high, got {spec.get('low')!r}, "
                                  f"{spec.get('high')!r}") from None
            if not param.low < param.high:
                raise ConfigError(f"{where}: low ({param.low}) must be below high ({param.high})")
            if (kind == "loguniform" or param.log) and param.low <= 0:
                raise ConfigError(f"{where}: a log scale needs low > 0")
            if kind == "int" and not (float(param.low).is_integer() and float(param.high).is_integer()):
                raise ConfigError(f"{where}: int bounds must be whole numbers")
            for v in (param.low, param.high):
                _check_value(cfg, key, int(v) if kind == "int" else v, where)
        params.append(param)
    return _order(params)


def _number(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise TypeError
    return float(value)  # YAML 1.1 reads 1e-4 as a string: float() takes it


def _check_value(cfg: Config, key: str, value: Any, where: str) -> None:
    """Raises ConfigError (naming `where`) unless the config accepts `value` for `key`."""
    cfg.updated({key: value}, source=where)


def _order(params: list[Param]) -> list[Param]:
    """Topological order: a parameter comes after every searched key its `when` refers to."""
    keys = {p.key for p in params}
    ordered: list[Param] = []
    placed: set[str] = set()
    pending = list(params)
    while pending:
        ready = [p for p in pending if all(k in placed or k not in keys for k in p.when)]
        if not ready:
            raise ConfigError("search.space: circular 'when' conditions among "
                              + ", ".join(p.key for p in pending))
        for p in ready:
            ordered.append(p)
            placed.add(p.key)
            pending.remove(p)
    return ordered


class DefineByRun:
    """The Optuna define-by-run function: suggests each active parameter, in order, and nothing else.

    A class rather than a closure because Ray pickles the searcher (and so this) with every experiment
    checkpoint.
    """

    def __init__(self, params: list[Param], base: Config):
        self.params, self.base = params, base

    def __call__(self, trial: Any) -> None:
        sampled: dict[str, Any] = {}
        for p in self.params:
            if p.active(sampled, self.base):
                sampled[p.key] = p.suggest(trial)


def check_points(points: list[dict[str, Any]], params: list[Param], base: Config) -> list[dict[str, Any]]:
    """`search.points`: known configs to evaluate first. Keys must be searched, values valid, conditions met."""
    by_key = {p.key: p for p in params}
    for i, point in enumerate(points):
        where = f"search.points[{i}]"
        if not isinstance(point, dict) or not point:
            raise ConfigError(f"{where} must be a mapping of searched keys to values")
        for key, value in point.items():
            if key not in by_key:
                raise ConfigError(f"{where}: '{key}' is not in search.space ({', '.join(by_key)})")
            _check_value(base, key, value, where)
            p = by_key[key]
            if p.type == "choice" and value not in p.values:
                raise ConfigError(f"{where}: {key}={value!r} is not among the choices {p.values}")
            if p.type != "choice":
                low, high = p.bounds()
                if not (isinstance(value, (int, float)) and low <= value <= high):
                    raise ConfigError(f"{where}: {key}={value!r} is outside the searched range [{low}, {high}]")
            if not p.active(point, base):
                raise ConfigError(f"{where}: '{key}' only applies when {p.when}, which this point does not meet")
    return [dict(p) for p in points]


def searched_students(cfg: Config, params: list[Param]) -> list[str]:
    """The student architectures a search's trials may train: `student.name`'s choices (and the config's own, where
    the choice is conditional and a trial may not sample it), or the config's one."""
    for p in params:
        if p.key == "student.name" and p.type == "choice":
            return list(dict.fromkeys([str(v) for v in p.values] + ([cfg.student.name] if p.when else [])))
    return [cfg.student.name]


def check_searched_models(base: Config, params: list[Param], weights: bool = True) -> dict[str, bool]:
    """The base config's teacher and student, and every student a searched choice can swap in, exist and load
    (timm's pretrained weights downloaded here where they are not cached: kd.hub). The models whose files the
    trials and teachers will read, by name: whether their weights are loaded (a model named by its source is read
    for its config.json either way)."""
    check_models(base, weights)
    configs = [base.teacher, base.student]
    for p in params:
        if p.type == "choice" and p.key.startswith("student."):
            for value in p.values:
                cfg = base.updated({p.key: value}, source=f"search.space['{p.key}']")
                try:
                    check_models(cfg, weights, roles=("student",))  # the teacher was checked above
                except UserError as e:
                    raise UserError(f"search.space['{p.key}'] offers {value!r}, which cannot work: {e}") from None
                configs.append(cfg.student)
    models: dict[str, bool] = {}
    for m in configs:
        if m.pretrained is True or source_of(m.name):
            models[m.name] = models.get(m.name, False) or m.pretrained is True
    searched = {p.key: p.values for p in params if p.type == "choice"}
    if True in searched.get("student.pretrained", []):  # a searched pretrained flag meets every searched student
        for name in [str(n) for n in searched.get("student.name", [base.student.name])]:
            try:
                pretrained_file(name, "student")  # downloaded now: the trials find it among the driver's files
            except UserError as e:
                raise UserError(f"search.space offers student.pretrained true with student.name {name!r}, which "
                                f"cannot work: {e}") from None
            models[name] = True
    return models
