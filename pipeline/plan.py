"""A study plan (`kdpipe sweep --plan FILE`): named arms, each a set of train-student settings (its own cache
included), the budgets (epochs) and seeds each runs at, twins by name, and one primary comparison with its
test and level, in a TOML file (docs/sweep.md has a full example).

Parsing and checking only: every part is a frozen dataclass that checks itself in __post_init__, and every
refusal is one line naming the plan file and the field (`plan.toml: arms.recipe.alpha: ...`). The plan's
points (arm x budget x seed x searched config) are what sweep.run_plan claims, one trial each, through the
same storage, claims and dead-worker recovery as a grid sweep; `Point.settings` is what a point is, by
content, so a later plan may add points but never change one that has a finished trial (sweep.record_plan).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from .config import SWEEPABLE, SweepConfig, TrainConfig
from .errors import KdpipeError
from .settings import setting, value_type

PLAN_KEYS = ("name", "description", "seeds", "budgets", "settings", "arms", "more_seeds", "primary", "comparisons",
             "imported")
ARM_KEYS = ("twin", "budgets", "seeds", "search")
PER_POINT = ("out", "name", "seed", "resume", "epochs")  # a point sets these itself (epochs: its budget)
NOT_RECORDED = ("out", "name", "resume", "device", "log_tensorboard", "from_recipe")  # where a point runs, not what it is
PATHS = ("cache", "dataset", "student")  # read from the plan file's folder when relative (dataset, student: if there)
TESTS = ("paired-t", "sign-flip")
ALTERNATIVES = ("greater", "less", "two-sided")
SPLITS = ("test", "validation")


def _fail(where: str, message: str):
    raise KdpipeError(f"{where}: {message}")


def _ints(where: str, value, what: str = "integers") -> tuple[int, ...]:
    ok = isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok:
        _fail(where, f"expected a non-empty list of {what}, e.g. [0, 1, 2] (got {value!r})")
    if len(set(value)) != len(value):
        _fail(where, f"repeated value in {value}")
    return tuple(value)


def _typed(where: str, name: str, value):
    """A train-student setting's value from TOML, of the field's type (an int where a float is expected is fine)."""
    kind = value_type(TrainConfig, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {float: number, int: isinstance(value, int) and not isinstance(value, bool), bool: isinstance(value, bool),
          str: isinstance(value, str), Path: isinstance(value, str), dict: isinstance(value, dict)}.get(kind, True)
    if not ok:
        _fail(where, f"expected {'a number' if kind in (int, float) else kind.__name__} (got {value!r})")
    return float(value) if kind is float else value


def _check_settings(where: str, raw: dict) -> dict:
    """Each train-student setting of an arm checked alone, by train-student's own rules and messages."""
    names = {f.name for f in dataclasses.fields(TrainConfig) if f.init}
    out = {}
    for key, value in raw.items():
        if key in PER_POINT:
            _fail(f"{where}.{key}", "set per point by the plan (budgets, seeds) and the sweep folder; remove it")
        if key not in names:
            _fail(f"{where}.{key}", "not a train-student setting (kdpipe train-student --help lists them)")
        out[key] = value = _typed(f"{where}.{key}", key, value)
        try:
            TrainConfig(**{"alpha": 0.0, "cache": ".", "dataset": ".", key: value})
        except KdpipeError as e:
            _fail(f"{where}.{key}", str(e))
    return out


@dataclass(frozen=True)
class Arm:
    """One named arm: train-student settings (the plan's `settings` under its own), searched values, the
    budgets and seeds it runs at, and its twin (the arm it is compared with, e.g. its lambda = 0 twin)."""
    file: Path
    name: str
    settings: dict  # as written (paths relative to the plan file)
    search: dict  # setting -> list of values (a grid)
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    twin: str | None = None

    def __post_init__(self):
        where = f"{self.file}: arms.{self.name}"
        if not self.name.replace("-", "").replace("_", "").isalnum():
            _fail(where, "an arm's name takes letters, digits, - and _ (it names run folders)")
        _check_settings(where, self.settings)
        for key, values in self.search.items():
            if key not in SWEEPABLE:
                _fail(f"{where}.search.{key}", f"not searchable; searchable: {', '.join(SWEEPABLE)}")
            if not isinstance(values, list) or len(values) < 2:
                _fail(f"{where}.search.{key}", f"a list of two or more values (got {values!r}); one value is a setting")
            for v in values:
                _typed(f"{where}.search.{key}", key, v)
        for budget in self.budgets:
            if budget < 1:
                _fail(f"{where}.budgets", f"epochs must be >= 1 (got {budget})")
        if self.twin == self.name:
            _fail(f"{where}.twin", "an arm is not its own twin")
        try:
            self.sweep(self.budgets[0], Path("."))
        except KdpipeError as e:
            _fail(where, str(e))

    def train(self, budget: int, base: Path | None) -> TrainConfig:
        """The arm's settings at `budget` epochs; paths resolved from the plan's folder `base` (None: as written)."""
        settings = {k: _typed("", k, v) for k, v in self.settings.items()}
        if base is not None:
            for key in PATHS:
                if isinstance(settings.get(key), str) and not Path(settings[key]).is_absolute():
                    there = base / settings[key]
                    if key == "cache" or there.exists():
                        settings[key] = str(there)
        return TrainConfig(**settings, epochs=budget)

    def sweep(self, budget: int, base: Path | None, **options) -> SweepConfig:
        """The arm at one budget as a grid sweep of its searched values (what sweep.grid_points expands)."""
        space = {k: ",".join(str(v).lower() if isinstance(v, bool) else repr(v) for v in values)
                 for k, values in self.search.items()}
        return SweepConfig(train=self.train(budget, base), space=space, seeds=list(self.seeds), **options)


@dataclass(frozen=True)
class MoreSeeds:
    """Seeds some arms run at some budgets besides the plan's (an extension: e.g. more pairs for one comparison)."""
    file: Path
    index: int
    arms: tuple[str, ...]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]

    def __post_init__(self):
        if not self.arms or not all(isinstance(a, str) for a in self.arms):
            _fail(f"{self.file}: more_seeds[{self.index}].arms", "a list of arm names")


@dataclass(frozen=True)
class Comparison:
    """`arm` minus `against`, paired by seed, at `budget` epochs on `split` (test accuracy of the epoch chosen
    on validation). `test`: paired-t (the exact sign-flip p is given beside it) or sign-flip; `alternative`:
    greater (arm better), less or two-sided; `level`: the test's alpha. `rule = "first"`: the same comparison
    at the epochs the first-tie rule would have chosen (run.json records them), a secondary result.
    `refute_below_pp` makes the primary comparison confirmatory: the size the study must be able to exclude.
    Once every planned pair has run, its verdict is CONFIRMED when p < level, REFUTED when the two-sided 95 %
    paired t interval lies entirely below this many points (both can hold: a gain smaller than claimed), and
    INCONCLUSIVE otherwise. Without it (an exploratory plan) the report gives no verdict."""
    file: Path
    where: str
    arm: str
    against: str
    budget: int
    split: str = "test"
    test: str = "paired-t"
    alternative: str = "greater"
    level: float = 0.05
    rule: str | None = None
    refute_below_pp: float | None = None
    note: str = ""

    def __post_init__(self):
        at = f"{self.file}: {self.where}"
        if self.split not in SPLITS:
            _fail(f"{at}.split", f"one of {', '.join(SPLITS)} (got {self.split!r})")
        if self.test not in TESTS:
            _fail(f"{at}.test", f"one of {', '.join(TESTS)} (got {self.test!r})")
        if self.alternative not in ALTERNATIVES:
            _fail(f"{at}.alternative", f"one of {', '.join(ALTERNATIVES)} (got {self.alternative!r})")
        if not (isinstance(self.level, (int, float)) and 0 < self.level < 1):
            _fail(f"{at}.level", f"a test level in (0, 1), e.g. 0.05 (got {self.level!r})")
        if self.rule not in (None, "first", "nll"):
            _fail(f"{at}.rule", f"first or nll (the best-epoch rule whose epochs are compared; got {self.rule!r})")
        if self.arm == self.against:
            _fail(f"{at}.against", "a comparison needs two different arms")
        if self.refute_below_pp is not None and not (isinstance(self.refute_below_pp, (int, float))
                                                     and not isinstance(self.refute_below_pp, bool)
                                                     and math.isfinite(self.refute_below_pp)):
            _fail(f"{at}.refute_below_pp", f"a difference in percentage points, e.g. 1.5 (got {self.refute_below_pp!r})")

    @property
    def key(self) -> str:
        rule = {None: "", "first": " (first-tie epochs)", "nll": " (NLL tie-break epochs)"}[self.rule]
        return f"{self.arm} - {self.against} @ E{self.budget} {self.split}{rule}"


@dataclass(frozen=True)
class Point:
    """One trial of the plan: an arm at a budget, a seed and (when the arm searches) one config."""
    arm: str
    budget: int
    seed: int
    params: dict
    settings: dict  # the run's train-student settings by content (TrainConfig.to_dict less NOT_RECORDED)

    @property
    def config(self) -> str:
        from .sweep import config_key

        return f"{self.arm}-e{self.budget}" + (f"-{config_key(self.params)}" if self.params else "")

    @property
    def key(self) -> str:
        return f"{self.config}-seed{self.seed}"


@dataclass(frozen=True)
class Plan:
    file: Path
    sha256: str  # of the file's bytes: the study records the plan by content
    name: str
    description: str
    arms: dict[str, Arm]
    more_seeds: tuple[MoreSeeds, ...]
    primary: Comparison
    comparisons: tuple[Comparison, ...]  # declared besides the primary
    imported: str | None = None  # a folder of an earlier study's run records (E<budget>/<arm>-seed<seed>.json)

    def __post_init__(self):
        for name, arm in self.arms.items():
            if arm.twin is not None and arm.twin not in self.arms:
                _fail(f"{self.file}: arms.{name}.twin", f"no arm named {arm.twin!r} (arms: {', '.join(self.arms)})")
        for more in self.more_seeds:
            where = f"{self.file}: more_seeds[{more.index}]"
            for arm in more.arms:
                if arm not in self.arms:
                    _fail(f"{where}.arms", f"no arm named {arm!r}")
                missing = set(more.budgets) - set(self.arms[arm].budgets)
                if missing:
                    _fail(f"{where}.budgets", f"arm {arm} does not run at {sorted(missing)} epochs")
                if set(more.seeds) & set(self.arms[arm].seeds):
                    _fail(f"{where}.seeds", f"arm {arm} already runs seeds {sorted(set(more.seeds) & set(self.arms[arm].seeds))}")
        for c in (self.primary, *self.comparisons):
            for side in ("arm", "against"):
                name = getattr(c, side)
                if name not in self.arms:
                    _fail(f"{self.file}: {c.where}.{side}", f"no arm named {name!r} (arms: {', '.join(self.arms)})")
                if c.budget not in self.arms[name].budgets:
                    _fail(f"{self.file}: {c.where}.budget", f"arm {name} does not run at {c.budget} epochs")

    @property
    def base(self) -> Path:
        return self.file.parent

    def seeds(self, arm: str, budget: int) -> tuple[int, ...]:
        extra = [s for m in self.more_seeds if arm in m.arms and budget in m.budgets for s in m.seeds]
        return (*self.arms[arm].seeds, *dict.fromkeys(extra))

    def points(self) -> dict[str, Point]:
        """Every trial of the plan, budget by budget, seed by seed (a pair's runs one after the other)."""
        from .sweep import grid_points

        out = {}
        budgets = sorted({b for a in self.arms.values() for b in a.budgets})
        for budget in budgets:
            arms = [a for a in self.arms.values() if budget in a.budgets]
            seeds = dict.fromkeys(s for a in arms for s in self.seeds(a.name, budget))
            for seed in seeds:
                for arm in arms:
                    if seed not in self.seeds(arm.name, budget):
                        continue
                    cfg = dataclasses.replace(arm.sweep(budget, None), seeds=[seed])
                    for p in grid_points(cfg):
                        settings = dataclasses.replace(cfg.train, **p.params, seed=seed).to_dict()
                        point = Point(arm.name, budget, seed, p.params,
                                      {k: v for k, v in settings.items() if k not in NOT_RECORDED})
                        out[point.key] = point
        return out

    def record(self) -> dict:
        """What the study records of the plan besides its points: enough for a report from the storage alone."""
        return {"sha256": self.sha256, "file": str(self.file), "name": self.name, "description": self.description,
                "arms": list(self.arms), "twins": {n: a.twin for n, a in self.arms.items()},
                "comparisons": [{k: v for k, v in dataclasses.asdict(c).items() if k != "file"} | {
                    "key": c.key, "primary": c is self.primary, "planned_pairs": self.pairs(c)}
                    for c in self.comparisons_all()]}

    def pairs(self, c: Comparison) -> int:
        """How many paired seeds the plan runs for a comparison: its verdict waits for all of them."""
        return len(set(self.seeds(c.arm, c.budget)) & set(self.seeds(c.against, c.budget)))

    def comparisons_all(self) -> list[Comparison]:
        """The primary, the declared ones, then every arm against its twin at each budget both run (test),
        each once: the family Holm's correction runs over."""
        out = {c.key: c for c in (self.primary, *self.comparisons)}
        for name, arm in self.arms.items():
            if arm.twin is None:
                continue
            for budget in arm.budgets:
                if budget in self.arms[arm.twin].budgets:
                    c = Comparison(self.file, f"arms.{name}.twin", name, arm.twin, budget, test=self.primary.test,
                                   alternative=self.primary.alternative, level=self.primary.level)
                    out.setdefault(c.key, c)
        return list(out.values())


def load(path: Path) -> Plan:
    """Read and check a plan file; one line naming the file and the field for anything wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KdpipeError(f"--plan {path}: cannot read it ({e.strerror or e}); pass a TOML plan file") from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise KdpipeError(f"{path}: not valid TOML ({e}); see docs/sweep.md for a plan's format") from None
    return parse(raw, path, hashlib.sha256(data).hexdigest())


def parse(raw: dict, path: Path, sha256: str = "") -> Plan:
    unknown = sorted(set(raw) - set(PLAN_KEYS))
    if unknown:
        _fail(f"{path}: {unknown[0]}", f"not a plan key; a plan has {', '.join(PLAN_KEYS)}")
    seeds = _ints(f"{path}: seeds", raw.get("seeds", [0, 1, 2]), "seeds")
    budgets = _ints(f"{path}: budgets", raw["budgets"], "epochs") if "budgets" in raw else None
    shared = raw.get("settings", {})
    if not isinstance(shared, dict):
        _fail(f"{path}: settings", "a table of train-student settings")
    _check_settings(f"{path}: settings", shared)
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        _fail(f"{path}: arms", "a plan needs at least one arm, e.g. [arms.recipe] with its settings")
    arms = {}
    for name, a in arms_raw.items():
        if not isinstance(a, dict):
            _fail(f"{path}: arms.{name}", "a table of settings")
        own = {k: v for k, v in a.items() if k not in ARM_KEYS}
        arm_budgets = _ints(f"{path}: arms.{name}.budgets", a["budgets"], "epochs") if "budgets" in a else budgets
        if arm_budgets is None:
            _fail(f"{path}: arms.{name}.budgets", "no budgets: give the plan's `budgets = [...]` or the arm's own")
        search = a.get("search", {})
        if not isinstance(search, dict):
            _fail(f"{path}: arms.{name}.search", "a table setting = [values]")
        twin = a.get("twin")
        if twin is not None and not isinstance(twin, str):
            _fail(f"{path}: arms.{name}.twin", "an arm's name")
        arms[name] = Arm(path, name, {**shared, **own}, search, arm_budgets,
                         _ints(f"{path}: arms.{name}.seeds", a["seeds"], "seeds") if "seeds" in a else seeds, twin)
    more = []
    for i, m in enumerate(raw.get("more_seeds", [])):
        where = f"{path}: more_seeds[{i}]"
        if not isinstance(m, dict) or set(m) != {"arms", "budgets", "seeds"}:
            _fail(where, "a table with arms = [...], budgets = [...] and seeds = [...]")
        more.append(MoreSeeds(path, i, tuple(m["arms"]) if isinstance(m["arms"], list) else (),
                              _ints(f"{where}.budgets", m["budgets"], "epochs"), _ints(f"{where}.seeds", m["seeds"])))
    if "primary" not in raw:
        _fail(f"{path}: primary", "a plan names one primary comparison, e.g. [primary] arm = \"kd\", "
                                  "against = \"kd-twin\", budget = 30")
    primary = _comparison(path, "primary", raw["primary"])
    declared = tuple(_comparison(path, f"comparisons[{i}]", c) for i, c in enumerate(raw.get("comparisons", [])))
    for key in ("name", "description", "imported"):
        if key in raw and not isinstance(raw[key], str):
            _fail(f"{path}: {key}", f"a string (got {raw[key]!r})")
    return Plan(path, sha256, raw.get("name", path.stem), raw.get("description", ""), arms, tuple(more), primary,
                declared, raw.get("imported"))


def _comparison(path: Path, where: str, raw) -> Comparison:
    names = [f.name for f in dataclasses.fields(Comparison) if f.name not in ("file", "where")]
    if not isinstance(raw, dict):
        _fail(f"{path}: {where}", "a table: arm, against, budget, and optionally split, test, alternative, level")
    unknown = sorted(set(raw) - set(names))
    if unknown:
        _fail(f"{path}: {where}.{unknown[0]}", f"not a comparison key; one has {', '.join(names)}")
    for key in ("arm", "against", "budget"):
        if key not in raw:
            _fail(f"{path}: {where}.{key}", "missing")
    if not isinstance(raw["budget"], int) or isinstance(raw["budget"], bool):
        _fail(f"{path}: {where}.budget", f"a number of epochs (got {raw['budget']!r})")
    return Comparison(path, where, **raw)


@dataclass
class PlanOption:
    """`kdpipe sweep --plan FILE`: the flag that turns a sweep into a plan's study."""
    plan: Path | None = setting(None, "A study plan (TOML): named arms with their settings and caches, budgets, seeds, "
                                      "twins, one primary comparison (docs/sweep.md). Takes the place of the "
                                      "train-student flags and --seeds.", panel="Study plan")


def describe(points: list[Point]) -> list[str]:
    """Points as lines a person reads: 'recipe at 300 epochs: seeds 3, 4, 5' (configs folded)."""
    groups: dict[tuple[str, int], list[int]] = {}
    for p in points:
        groups.setdefault((p.arm, p.budget), []).append(p.seed)
    return [f"{arm} at {budget} epochs: seed{'s' * (len(seeds) > 1)} {', '.join(map(str, sorted(set(seeds))))}"
            for (arm, budget), seeds in sorted(groups.items())]
