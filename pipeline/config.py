"""Argument dataclasses for each command. Defaults carry a one-line reason; `__post_init__` validates
and names the flag in its error, so the CLI and the Python API refuse the same things."""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import KdpipeError
from .loss import LOSSES, STANDARDIZABLE
from .runtime import DEVICES, PRECISIONS
from .views import ViewPolicy

DATA_ROOT = Path("data")
SCHEDULES = ("linear", "cosine", "constant")
AUGMENTS = ("none", "flip")
MIXES = ("none", "mixup", "cutmix")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KdpipeError(message)


def _finite_at_least(name: str, value, flag: str, low: float = 0.0) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    _check(ok, f"{flag} must be a finite number >= {low:g} (got {value})")


FLAGS = {"temperature": "-T/--temperature", "stale_after_s": "--stale-after"}  # where not --<name>


def _finite_floats(config) -> None:
    """Every float setting must be a finite number: inf passes `> 0` checks and trains to NaN, and nan fails
    every range check with a message that hides the real problem."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise KdpipeError(f"{FLAGS.get(f.name, '--' + f.name.replace('_', '-'))} must be a finite number "
                              f"(got {value})")


def _positive(name: str, value, flag: str) -> None:
    _check(value is not None and value > 0, f"{flag} must be > 0 (got {value})")


@dataclass
class CacheConfig:
    teacher: str = "merve/beans-vit-224"  # the guide's fine-tuned ViT-B/16 teacher
    revision: str | None = None  # hub branch, tag or commit of the teacher; None = main
    dataset: str = "beans"  # the guide's dataset (hub id, image folder or Parquet/Arrow)
    dataset_revision: str | None = None
    splits: list[str] | None = None  # None = every split present
    image_column: str | None = None  # None = detect (image, img)
    label_column: str | None = None  # None = detect (label, labels)
    out: Path | None = None  # None = data/cache/<teacher>/<dataset>
    batch_size: int = 32  # large enough to keep the teacher busy; inference holds no activations
    precision: str = "auto"  # bf16 where the hardware is fast at it, else fp32
    device: str = "auto"
    workers: int | None = None  # None = one per spare core, decoding overlaps the teacher
    force: bool = False  # rebuild even when a valid cache for the same inputs exists
    trust_remote_code: bool = False  # never run a repository's code unless asked
    topk: int | None = None  # store only the K largest logits (+ logsumexp): for thousands of classes
    topk_dtype: str = "float32"  # float16 halves the top-K values again (about 1e-3 relative rounding)
    views: int = 0  # K random views per image of view_splits, besides view 0 (the image itself)
    view_splits: list[str] = field(default_factory=lambda: ["train"])  # evaluation splits stay un-augmented
    augment: ViewPolicy = field(default_factory=ViewPolicy)  # how the K views are drawn

    def __post_init__(self):
        _positive("batch_size", self.batch_size, "--batch-size")
        _check(self.views >= 0, f"--views must be >= 0 (got {self.views})")
        _check(not self.augment.mixup or self.views > 0, "--view-mixup blends the augmented views: add --views K")
        _check(self.topk is None or self.topk > 0, f"--topk must be > 0 (got {self.topk})")
        _check(self.topk_dtype in ("float32", "float16"), "--topk-dtype must be float32 or float16")
        _check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        _check(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}")
        _check(self.workers is None or self.workers >= 0, "--workers must be >= 0")
        cores = os.cpu_count() or 1
        _check(self.workers is None or self.workers <= 4 * cores, f"--workers {self.workers}: more than 4 decoding "
               f"processes per core ({cores} here) only add memory; use at most {4 * cores}")
        if self.out is not None:
            self.out = Path(self.out)

    def out_dir(self) -> Path:
        from .data import slug

        return self.out or DATA_ROOT / "cache" / slug(self.teacher) / slug(self.dataset)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class TrainConfig:
    cache: Path | None = None  # stage one's folder; None only for alpha=0 (from scratch)
    dataset: str | None = None  # None = the dataset the cache was built from
    image_column: str | None = None
    label_column: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str | None = "test"  # None = no test evaluation
    student: str | None = None  # None = MobileNetV2 (transformers defaults) from random init, as the guide
    student_config: dict = field(default_factory=dict)  # overrides, e.g. {"depth_multiplier": 0.75}
    temperature: float = 5.0  # the guide's T
    alpha: float = 0.5  # the guide's lambda: weight of the KD term; 0 = plain cross-entropy
    loss: str = "kd"  # the KD term: Hinton et al. (2015), the guide's; dkd | dist (docs/training.md)
    standardize: bool = False  # z-score both logit vectors before T (Sun et al., 2024); kd and dkd only
    dkd_beta: float = 8.0  # DKD's non-target weight: Zhao et al.'s CIFAR-100 value, mdistiller's default
    dist_gamma: float = 1.0  # DIST's intra- to inter-class weight: Huang et al. (2022) set beta = gamma = 1
    lr: float = 5e-5  # transformers Trainer default, which the guide uses
    batch_size: int = 8  # the guide's per-device batch size
    epochs: int = 30  # the guide's num_train_epochs
    weight_decay: float = 0.0  # Trainer default
    schedule: str = "linear"  # Trainer default: linear decay to 0, no warmup
    warmup_ratio: float = 0.0
    bn_momentum: float | None = 0.1  # PyTorch semantics; transformers' MobileNetV2 ships 0.997 (see docs)
    precise_bn: bool = False  # recompute BN statistics over the train split before each evaluation
    views: bool = False  # train on the cache's stored augmented views (cache-teacher --views K), one per epoch
    eval_size: int | None = None  # validation, test and the saved preprocessor at this resolution; None = training's
    augment: str = "none"  # online augmentation the cache does not cover ("flip"): inconsistent with the teacher
    allow_inconsistent: bool = False  # permit --augment with a KD term (recorded as a warning in run.json)
    allow_changed_data: bool = False  # train although images changed since the cache was built (recorded)
    mix: str = "none"  # mixup|cutmix of each batch with its own permutation, soft targets mixed alike (approximate)
    mix_alpha: float = 1.0  # Beta(a, a) for the mixing weight; 1.0 = uniform, as in CutMix (Yun et al., 2019)
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    compile: bool = False
    workers: int = 0  # batches come from an in-memory uint8 tensor: workers only add overhead
    out: Path | None = None  # None = data/runs/<name>
    name: str | None = None  # None = derived from the settings
    resume: bool = False
    log_tensorboard: bool = True  # when the tensorboard extra is installed

    def __post_init__(self):
        _finite_floats(self)
        if self.cache is not None:
            self.cache = Path(self.cache)
        if self.out is not None:
            self.out = Path(self.out)
        _positive("temperature", self.temperature, "--temperature")
        _check(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1] (got {self.alpha})")
        _check(self.augment in AUGMENTS, f"--augment must be one of {', '.join(AUGMENTS)}")
        _check(self.augment == "none" or self.alpha == 0 or self.allow_inconsistent,
               f"--augment {self.augment} changes the student's input but not the cached teacher's, so the KD "
               "targets would belong to another image; cache views (cache-teacher --views K) and train with "
               "--views, or pass --allow-inconsistent")
        _check(self.mix in MIXES, f"--mix must be one of {', '.join(MIXES)}")
        _check(self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)} (got {self.loss!r})")
        _check(not self.standardize or self.loss in STANDARDIZABLE,
               f"--standardize applies to --loss {' or '.join(STANDARDIZABLE)} (Sun et al. 2024), not --loss {self.loss}")
        _check(self.loss != "dkd" or self.mix == "none",
               f"--loss dkd splits each example's target class from the others, and --mix {self.mix} blends two "
               "examples with two targets; use --loss kd or dist with --mix")
        _finite_at_least("dkd_beta", self.dkd_beta, "--dkd-beta")
        _finite_at_least("dist_gamma", self.dist_gamma, "--dist-gamma")
        _positive("mix_alpha", self.mix_alpha, "--mix-alpha")
        _check(self.alpha == 0 or self.cache is not None,
               "--cache is required when --alpha > 0 (the KD term needs teacher logits); use --alpha 0 for a "
               "from-scratch baseline")
        _check(self.cache is not None or self.dataset is not None, "pass --cache, or --dataset with --alpha 0")
        _positive("lr", self.lr, "--lr")
        _positive("batch_size", self.batch_size, "--batch-size")
        _positive("epochs", self.epochs, "--epochs")
        _check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _check(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}")
        _check(0.0 <= self.warmup_ratio < 1.0, "--warmup-ratio must be in [0, 1)")
        _check(self.bn_momentum is None or 0.0 < self.bn_momentum <= 1.0,
               "--bn-momentum must be in (0, 1] (PyTorch semantics: weight of the newest batch)")
        _check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        _check(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}")
        _check(self.workers >= 0, "--workers must be >= 0")
        _check(self.eval_size is None or (isinstance(self.eval_size, int) and self.eval_size > 0),
               f"--eval-size must be a positive number of pixels (got {self.eval_size})")
        _check(not self.eval_size or self.train_split not in (self.val_split, self.test_split),
               f"--eval-size evaluates at another resolution than training, and --train-split {self.train_split} is "
               "also the validation or test split; use separate splits")

    def run_name(self) -> str:
        if self.name:
            return self.name
        arm = "scratch" if self.alpha == 0 else f"kd-T{self.temperature:g}-a{self.alpha:g}"
        return f"{arm}-lr{self.lr:g}-bs{self.batch_size}-e{self.epochs}-s{self.seed}"

    def out_dir(self) -> Path:
        return self.out or DATA_ROOT / "runs" / self.run_name()

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def without_new_defaults(now: dict, saved: dict) -> dict:
    """`now` (a TrainConfig.to_dict(), or part of one) less the settings `saved` lacks that hold their default:
    a later kdpipe added them, and their default is what the earlier one did, so runs and sweeps started
    before the upgrade still resume."""
    return {k: v for k, v in now.items() if k in saved or k not in TRAIN_DEFAULTS or v != TRAIN_DEFAULTS[k]}


def parse_overrides(text: str | None, flag: str = "--student-config") -> dict:
    """`key=value,key=value` -> dict with ints, floats and booleans parsed."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        _check(bool(sep and key.strip()), f"{flag}: expected key=value[,key=value...] (got {part!r})")
        out[key.strip()] = _parse_scalar(value.strip())
        _check(not isinstance(out[key.strip()], float) or math.isfinite(out[key.strip()]),
               f"{flag}: {part.strip()} is not a finite number")
    return out


def _parse_scalar(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# Train-student settings a sweep can search, with their types (flags: --temperature, --alpha, ...).
SWEEPABLE = {"temperature": float, "alpha": float, "lr": float, "batch_size": int, "epochs": int,
             "weight_decay": float, "warmup_ratio": float, "schedule": str, "bn_momentum": float, "mix": str,
             "mix_alpha": float, "loss": str, "standardize": bool, "dkd_beta": float, "dist_gamma": float}
# Settings of one loss only (the losses each applies to): a config of another loss leaves them out.
LOSS_SETTINGS = {"standardize": STANDARDIZABLE, "dkd_beta": ("dkd",), "dist_gamma": ("dist",)}


def applicable(params: dict, base: TrainConfig) -> dict:
    """`params` (searched settings of one config) less those that change nothing in it: with alpha = 0 the
    temperature, the loss and its settings (there is no KD term); otherwise the settings of other losses."""
    if params.get("alpha", base.alpha) == 0:
        return {k: v for k, v in params.items() if k not in ("temperature", "loss", *LOSS_SETTINGS)}
    loss = params.get("loss", base.loss)
    return {k: v for k, v in params.items() if k not in LOSS_SETTINGS or loss in LOSS_SETTINGS[k]}


SAMPLERS = ("grid", "tpe")
PRUNERS = ("none", "median", "halving")


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a list of choices, or (tpe only) a range low:high[:log]."""
    name: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def to_dict(self) -> dict:
        return {"choices": list(self.choices)} if not self.is_range else \
            {"low": self.low, "high": self.high, "log": self.log}


def parse_dimension(name: str, text: str) -> Dimension:
    """`1,2,5` -> choices; `1e-5:1e-2:log` or `0:1` -> a range. Values are checked by TrainConfig's rules."""
    flag, kind = f"--{name.replace('_', '-')}", SWEEPABLE[name]
    text = text.strip()
    _check(bool(text), f"{flag}: empty search space; give values like 1,2,5 or a range like 1e-5:1e-2:log")
    try:
        if ":" in text:
            parts = text.split(":")
            _check(len(parts) in (2, 3) and (len(parts) == 2 or parts[2] == "log") and kind not in (str, bool),
                   f"{flag}: a range is low:high or low:high:log (got {text!r})")
            low, high = kind(parts[0]), kind(parts[1])
            _check(math.isfinite(low) and math.isfinite(high), f"{flag}: a range needs finite ends (got {text!r})")
            _check(low < high, f"{flag}: range low must be below high (got {text!r})")
            _check(len(parts) == 2 or low > 0, f"{flag}: a log range needs low > 0 (got {text!r})")
            dim = Dimension(name, low=low, high=high, log=len(parts) == 3)
            for v in (low, high):
                _valid_setting(name, v)
            return dim
        values = [(_bool if kind is bool else kind)(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise KdpipeError(f"{flag}: cannot read {text!r} as {kind.__name__} values (e.g. 1,2,5 or 1e-5:1e-2:log)") from None
    _check(bool(values), f"{flag}: empty search space; give values like 1,2,5")
    _check(len(set(values)) == len(values), f"{flag}: repeated value in {text!r}")
    for v in values:
        _valid_setting(name, v)
    return Dimension(name, choices=tuple(values))


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"


def _valid_setting(name: str, value) -> None:
    """Apply train-student's own checks (and error messages) to one searched value."""
    TrainConfig(**{"alpha": 0.0, "cache": ".", "dataset": ".", name: value})


TRAIN_DEFAULTS = {f.name: (f.default if f.default is not MISSING else f.default_factory())
                  for f in fields(TrainConfig) if f.default is not MISSING or f.default_factory is not MISSING}


@dataclass
class SweepConfig:
    train: TrainConfig  # everything not searched (cache, student, precision, ...); out/seed/name are per trial
    space: dict[str, str] = field(default_factory=dict)  # setting -> "1,2,5" or "1e-5:1e-2:log" (as typed)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # a claim needs a spread; 3 is the minimum
    sampler: str = "grid"  # every config x every seed; "tpe" samples --trials configs
    trials: int | None = None  # tpe: how many configs
    prune: str = "none"  # stop hopeless trials on per-epoch validation accuracy (median | halving)
    storage: str | None = None  # None = a journal file in the sweep folder; or an RDB URL for many workers
    out: Path | None = None  # None = data/sweeps/<name>
    name: str | None = None  # study name; None = the folder's name
    stale_after_s: float = 3600.0  # a RUNNING trial of another host that is silent this long is rerun

    def __post_init__(self):
        _finite_floats(self)
        if self.out is not None:
            self.out = Path(self.out)
        _check(self.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}")
        _check(self.prune in PRUNERS, f"--prune must be one of {', '.join(PRUNERS)}")
        _check(bool(self.seeds), "--seeds: give at least one seed, e.g. 0,1,2")
        _check(len(set(self.seeds)) == len(self.seeds), f"--seeds: repeated seed in {self.seeds}")
        unknown = set(self.space) - set(SWEEPABLE)
        _check(not unknown, f"cannot sweep {sorted(unknown)}; searchable: {', '.join(SWEEPABLE)}")
        dims = self.dimensions()
        if self.sampler == "grid":
            ranged = [d.name for d in dims.values() if d.is_range]
            _check(not ranged, f"--{ranged[0].replace('_', '-') if ranged else ''}: ranges need --sampler tpe; "
                               "a grid takes lists like 1,2,5")
            _check(self.trials is None, "--trials is for --sampler tpe; a grid runs every config")
        else:
            _check(self.trials is not None and self.trials > 0, "--sampler tpe needs --trials N (N > 0)")
            _check(bool(dims), "--sampler tpe needs at least one searched setting, e.g. --lr 1e-5:1e-2:log")
        losses = dims["loss"].choices if "loss" in dims else (self.train.loss,)
        mixes = dims["mix"].choices if "mix" in dims else (self.train.mix,)
        _check("dkd" not in losses or set(mixes) == {"none"},
               "--loss dkd cannot run with --mix (one target class per example); sweep dkd and --mix separately")
        _check(not (self.train.standardize and "dist" in losses),
               "--standardize true does not apply to --loss dist; search --standardize true,false instead "
               "(dist configs run without it)")
        alpha = dims.get("alpha")
        alphas = (self.train.alpha,) if alpha is None else alpha.choices or (alpha.low, alpha.high)
        _check(self.train.cache is not None or max(alphas) == 0,
               "--cache is required when --alpha is > 0 (the KD term needs teacher logits)")
        _check(self.stale_after_s > 0, "--stale-after must be > 0 seconds")

    def dimensions(self) -> dict[str, Dimension]:
        return {name: parse_dimension(name, text) for name, text in self.space.items()}

    def out_dir(self) -> Path:
        return self.out or DATA_ROOT / "sweeps" / (self.name or "sweep")

    def study_name(self) -> str:
        return self.name or self.out_dir().resolve().name

    def spec(self) -> dict:
        """What makes two workers part of the same sweep (compared when a worker joins)."""
        train = self.train.to_dict()
        for k in ("out", "name", "seed", "resume", "device", "workers", *self.space):
            train.pop(k, None)
        return {"space": {k: d.to_dict() for k, d in self.dimensions().items()}, "seeds": list(self.seeds),
                "sampler": self.sampler, "trials": self.trials, "prune": self.prune, "train": train}


def split_space(flags: dict[str, str | None]) -> tuple[dict, dict[str, str]]:
    """Sweep flags -> (fixed settings, searched settings): a flag with one value is a fixed setting of
    every run (it does not appear in config names); two or more values, or a range, are searched."""
    fixed, space = {}, {}
    for name, text in flags.items():
        if text is None:
            continue
        dim = parse_dimension(name, text)
        if len(dim.choices) == 1:
            fixed[name] = dim.choices[0]
        else:
            space[name] = text
    return fixed, space
