"""Argument dataclasses for each command, the one place each setting lives: its default (with a one-line
reason), its help and flags (`setting`, settings.py; cli.py builds the options from them) and its check in
`__post_init__`, which names the flag, so the CLI and the Python API refuse the same things."""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import KdpipeError
from .settings import comma_list, flag, ints, none_if_empty, overrides, setting, value_type
from .loss import LOSSES, own_settings, standardizable
from .metrics import BEST_EPOCH_RULES
from .runtime import DEVICES, PRECISIONS
from .views import ViewPolicy

DATA_ROOT = Path("data")
SCHEDULES = ("linear", "cosine", "constant")
RECIPE_SHOWN = "the recipe's"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KdpipeError(message)


def _finite_at_least(name: str, value, flag: str, low: float = 0.0) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    _check(ok, f"{flag} must be a finite number >= {low:g} (got {value})")


def _finite_floats(config) -> None:
    """Every float setting must be a finite number: inf passes `> 0` checks and trains to NaN, and nan fails
    every range check with a message that hides the real problem."""
    for f in fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise KdpipeError(f"{flag(f)} must be a finite number (got {value})")


def _plain_name(name: str | None, flag: str, where: str) -> None:
    """A --name becomes a folder under data/runs or data/sweeps: a plain name, never a path out of it."""
    _check(name is None or (bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")),
           f"{flag} {name!r}: a name is a plain folder name under {where} (no / or \\, not . or ..); to write "
           "elsewhere pass --out PATH")


def _positive(name: str, value, flag: str) -> None:
    _check(value is not None and value > 0, f"{flag} must be > 0 (got {value})")


@dataclass
class CacheConfig:
    teacher: str = setting("merve/beans-vit-224", "Hub id or local save_pretrained folder.")  # the guide's ViT-B/16
    revision: str | None = setting(None, "Hub branch, tag or commit of the teacher.", shown="main")
    dataset: str = setting("beans", "Hub id, image folder (split/class/*.jpg) or Parquet/Arrow.")  # the guide's
    dataset_revision: str | None = setting(None, "Hub revision of the dataset.", shown="main")
    splits: list[str] | None = setting(None, "Comma-separated splits.", shown="every split", parse=comma_list)
    image_column: str | None = setting(None, "Image column.", shown="image or img")
    label_column: str | None = setting(None, "Label column.", shown="label or labels")
    out: Path | None = setting(None, "Output folder.", shown="data/cache/<teacher>/<dataset>")
    # fastest of 8/16/32 on a 2-core CPU for both a ViT-B and EfficientNet-Lite0 (bench_view_forward.py)
    batch_size: int = setting(16, "Teacher inputs per forward (a GPU wants more, e.g. 128).")
    precision: str = setting("auto", "auto|fp32|bf16|fp16 (auto: bf16 where the hardware is fast at it, else fp32).")
    device: str = setting("auto", "auto|cpu|cuda.")
    workers: int | None = setting(None, "Decoding processes beside the teacher.", shown="one per spare core")
    force: bool = setting(False, "Rebuild even if a valid cache for the same inputs exists.", flags=("--force",))
    # generic names (LABEL_i) carry no class: matching them by position is the user's claim, so it is asked for
    labels_by_index: bool = setting(False, "Match a teacher whose labels are generic (LABEL_0 ... LABEL_n, saved without "
                                           "id2label) to the dataset's classes by position; recorded in the cache.",
                                    flags=("--labels-by-index",))
    trust_remote_code: bool = setting(False, "Allow the teacher repository's own code (off: never run it unasked).",
                                      flags=("--trust-remote-code",))
    # off: a Parquet entry naming /etc/... or a test image of another folder is read by nobody's intent
    allow_outside_images: bool = setting(False, "Read image files that dataset entries name outside the dataset's "
                                                "folder (recorded in the cache).", flags=("--allow-outside-images",))
    topk: int | None = setting(None, "Store only the K largest logits per image (+ logsumexp), for thousands of "
                                     "classes.", shown="all")
    # float16 halves the top-K values again (about 1e-3 relative rounding)
    topk_dtype: str = setting("float32", "float32|float16 for the top-K values.")
    views: int = setting(0, "K random augmented views per image of --view-splits, besides the image itself.",
                         panel="Views")
    view_splits: list[str] = setting(help="Comma-separated splits that get views (evaluation splits stay "
                                          "un-augmented).", factory=lambda: ["train"], parse=comma_list, panel="Views")
    augment: ViewPolicy = setting(help="How the K views are drawn (the --view-* flags).", factory=ViewPolicy,
                                  panel="Views")

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
        from . import demo
        from .data import slug

        names = slug(demo.resolve(self.teacher, "teacher")), slug(demo.resolve(self.dataset, "dataset"))
        return self.out or DATA_ROOT.joinpath("cache", *names)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# Named recipes: the optimisation settings a run takes where no flag sets them (`--recipe NAME`; a flag overrides
# one value). student_config entries apply to the default student (MobileNetV2 from scratch) only: another
# student's config may not have the field.
RECIPES = {
    # validated on real Beans (docs/results.md §3): 15 epochs of it beat the guide's 30 by 15 pp on test
    "kdpipe": {"lr": 3e-3, "batch_size": 32, "epochs": 15, "schedule": "cosine", "warmup_ratio": 0.05,
               "weight_decay": 0.05, "bn_momentum": 0.1, "student_config": {"classifier_dropout_prob": 0.2}},
    # the Transformers guide exactly: Trainer's defaults, MobileNetV2's own dropout 0.8 and BN momentum 0.997
    "guide": {"lr": 5e-5, "batch_size": 8, "epochs": 30, "schedule": "linear", "warmup_ratio": 0.0,
              "weight_decay": 0.0, "bn_momentum": 0.997, "student_config": {}},
    # kdpipe's defaults before recipes existed (the guide's, BN momentum 0.1, MobileNetV2 at its 224 px whatever
    # the data): what a run or sweep started then resumes with (TrainConfig.as_started)
    "before-recipes": {"lr": 5e-5, "batch_size": 8, "epochs": 30, "schedule": "linear", "warmup_ratio": 0.0,
                       "weight_decay": 0.0, "bn_momentum": 0.1, "student_config": {"image_size": 224}},
}
BEFORE_RECIPES = "before-recipes"
DEFAULT_RECIPE = "kdpipe"


def _words(values: dict) -> str:
    """{"lr": 0.003, "batch_size": 32} -> `lr 0.003, batch_size 32`."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


def describe_recipe(name: str) -> str:
    """`lr 0.003, batch_size 32, ...`: a recipe's values as one line."""
    values = {k: v for k, v in RECIPES[name].items() if k != "student_config"}
    extra = ",".join(f"{k}={v}" for k, v in RECIPES[name]["student_config"].items())
    return _words(values) + (f", student_config {extra}" if extra else "")


def recipe_line(cfg: "TrainConfig") -> str:
    """`recipe kdpipe: lr 0.003, ...; set by flags: lr 0.001`: the recipe and the values flags changed in it."""
    flags = {k: getattr(cfg, k) for k in set_by_flags(cfg.to_dict())}
    return f"recipe {cfg.recipe}: {describe_recipe(cfg.recipe)}" + (f"; set by flags: {_words(flags)}" if flags else "")


def set_by_flags(config: dict) -> list[str]:
    """The recipe's settings that flags set instead, in a TrainConfig.to_dict() (run.json's config)."""
    return [k for k in RECIPES.get(config.get("recipe"), {}) if k != "student_config"
            and k not in (config.get("from_recipe") or ())]


EXPORTERS = {"dynamo": (18, 23), "torchscript": (7, 20)}  # torch.onnx's exporters and the opsets each writes


@dataclass
class ExportConfig:
    """`kdpipe export RUN`: the student as ONNX (and int8), its fidelity checked against bounds fixed here before
    anything is measured, and its speed and size beside the teacher's (export.py)."""
    # torch.onnx's maintained exporter (torch.export based); the TorchScript one is deprecated since torch 2.9
    exporter: str = setting("dynamo", "dynamo|torchscript: torch.onnx's exporter (torchscript: the older one, for a "
                                      "student torch.export cannot trace).")
    # the dynamo exporter's own default in torch 2.13; ONNX Runtime >= 1.17 runs it
    opset: int = setting(20, "ONNX opset (dynamo: 18-23, torchscript: 7-20).")
    int8: bool = setting(False, "Also write a static int8 (QDQ) model, calibrated on train images.", flags=("--int8",))
    # MinMax ranges settle within ~100 images on Beans; calibration time grows linearly with the count
    calibration_images: int = setting(128, "Train images (one stored view of each, where the run trained on views) "
                                           "that calibrate --int8.")
    # the issue's bounds (#61), fixed before measuring: an fp32 export should be the same function up to rounding
    max_logit_diff: float = setting(1e-3, "Largest |ONNX fp32 logit - PyTorch logit| accepted, on validation and "
                                          "test.", panel="Bounds (refused when missed)")
    min_agreement: float = setting(1.0, "Smallest argmax agreement of the ONNX fp32 model with the PyTorch student.",
                                   panel="Bounds (refused when missed)")
    # 1 pp: about one Beans test image (128); int8 rounding should flip no more than that
    int8_max_drop: float = setting(0.01, "Largest accuracy drop (a fraction) of the int8 model below the PyTorch "
                                         "student accepted, on validation and test.", panel="Bounds (refused when missed)")
    speed: bool = setting(True, "Time teacher and student (latency at batch 1, throughput at batch 32).",
                          flags=("--speed/--no-speed",), panel="Speed")
    # 30 batch-1 forwards give a stable median and p90 on a shared 2-core CPU in seconds for a small student
    latency_runs: int = setting(30, "Batch-1 forwards timed per model.", panel="Speed")
    throughput_batches: int = setting(3, "Batches of 32 timed per model.", panel="Speed")
    teacher: str | None = setting(None, "The teacher to time beside the student.", shown="the run's cache's",
                                  panel="Speed")
    dataset: str | None = setting(None, "Where the run's dataset is now (fidelity and calibration use its splits).",
                                  shown="the run's")

    def __post_init__(self):
        _finite_floats(self)
        _check(self.exporter in EXPORTERS, f"--exporter {self.exporter!r} is not supported; use "
               f"{' or '.join(EXPORTERS)} (torch.onnx's exporters)")
        low, high = EXPORTERS.get(self.exporter, (0, 0))
        _check(low <= self.opset <= high, f"--opset {self.opset} is not supported by --exporter {self.exporter}; "
               f"use {low}-{high}")
        _check(self.calibration_images > 0, f"--calibration-images must be > 0 (got {self.calibration_images})")
        _check(self.max_logit_diff >= 0, f"--max-logit-diff must be >= 0 (got {self.max_logit_diff})")
        _check(0 <= self.min_agreement <= 1, f"--min-agreement must be in [0, 1] (got {self.min_agreement})")
        _check(0 <= self.int8_max_drop <= 1, f"--int8-max-drop must be in [0, 1] (got {self.int8_max_drop})")
        _check(self.latency_runs > 0, f"--latency-runs must be > 0 (got {self.latency_runs})")
        _check(self.throughput_batches > 0, f"--throughput-batches must be > 0 (got {self.throughput_batches})")


@dataclass
class TrainConfig:
    # data
    cache: Path | None = setting(None, "Stage one's folder (required unless --alpha 0; with --alpha 0, the inputs of "
                                       "its distilled runs).", panel="Data")
    dataset: str | None = setting(None, "Dataset.", shown="the one the cache was built from", panel="Data")
    image_column: str | None = setting(None, "Image column.", shown="as cached, or detected", panel="Data")
    label_column: str | None = setting(None, "Label column.", shown="as cached, or detected", panel="Data")
    train_split: str = setting("train", "Split to train on.", panel="Data")
    val_split: str = setting("validation", "Split that picks the best epoch.", panel="Data")
    test_split: str | None = setting("test", "Split reported at the end ('' for none).", parse=none_if_empty,
                                     panel="Data")
    # None = MobileNetV2 (transformers defaults) from random init, as the guide
    student: str | None = setting(None, "Hub id or folder.", shown="MobileNetV2 from scratch", panel="Data")
    student_config: dict = setting(help="Config overrides, e.g. depth_multiplier=0.75,image_size=160 (fields of the "
                                       "student's config; another name is refused; the recipe may add "
                                       "classifier_dropout_prob to MobileNetV2 from scratch).",
                                   factory=dict, parse=overrides, panel="Data")
    eval_size: int | None = setting(None, "Validate, test and save the student at this resolution.",
                                    shown="its training resolution", panel="Data")
    # the KD term
    temperature: float = setting(5.0, "Softmax temperature T of the KD term.", flags=("--temperature", "-T"),
                                 search="T", panel="Distillation")  # the guide's T
    alpha: float = setting(0.5, "Weight of the KD term (0 = from scratch, 1 = pure distillation: labels unused). "
                                "A distilled run's twin is --alpha 0 with the same --cache: the same inputs (the "
                                "teacher's resolution, mean and std), only the KD term dropped; without a cache the "
                                "inputs differ (mean/std 0.5, resolution from the images).",
                           flags=("--alpha", "--lambda"), search="a", panel="Distillation")  # the guide's lambda
    # optimisation: None = the recipe's value (RECIPES; the recipe is resolved in __post_init__)
    lr: float | None = setting(None, "Peak learning rate (AdamW).", shown=RECIPE_SHOWN, search="lr",
                               panel="Optimisation")
    batch_size: int | None = setting(None, "Training batch size.", shown=RECIPE_SHOWN, search="bs", panel="Optimisation")
    epochs: int | None = setting(None, "Training epochs.", shown=RECIPE_SHOWN, search="e", panel="Optimisation")
    weight_decay: float | None = setting(None, "AdamW weight decay (not on biases and norm scales).", shown=RECIPE_SHOWN,
                                         search="wd", panel="Optimisation")
    warmup_ratio: float | None = setting(None, "Fraction of steps of linear warm-up.", shown=RECIPE_SHOWN, search="wu",
                                         panel="Optimisation")
    schedule: str | None = setting(None, "linear|cosine|constant learning-rate schedule.", shown=RECIPE_SHOWN,
                                   search="", panel="Optimisation")
    # PyTorch semantics; transformers' MobileNetV2 ships 0.997, the guide's (docs/training.md)
    bn_momentum: float | None = setting(None, "BatchNorm momentum, PyTorch semantics (0.997 = the guide's).",
                                        shown=RECIPE_SHOWN, search="bnm", panel="Optimisation")
    precise_bn: bool = setting(False, "Recompute BN statistics on the train split before each evaluation.",
                               flags=("--precise-bn/--no-precise-bn",), panel="Optimisation")
    # a saturated validation split ties many epochs; the first of them (the old rule) can be an early one, still
    # at a high learning rate, and NLL still separates them (docs/training.md, "Choosing the epoch")
    best_epoch: str = setting("nll", "Epoch kept, of those with the best validation accuracy: nll (the lowest "
                                     "validation NLL, then the later) | first (the first of them).",
                              panel="Optimisation")
    # augmentation: only the views the teacher saw (cache-teacher --views K, --view-mixup a), never an online
    # transform the cached logits do not belong to
    views: bool = setting(False, "Train on the cache's stored augmented views (one per image per epoch).",
                          flags=("--views/--no-views",), panel="Data")
    # other KD terms from the same cache (docs/training.md)
    loss: str = setting("kd", f"KD term: {' | '.join(f'{n} ({e.about})' for n, e in LOSSES.items())}.",
                        search="", panel="Distillation")
    standardize: bool = setting(False, "z-score both logit vectors before T (Sun 2024); kd and dkd.",
                                flags=("--standardize/--no-standardize",), search="ls", panel="Distillation")
    # Zhao et al.'s CIFAR-100 value, mdistiller's default
    dkd_beta: float = setting(8.0, "dkd: weight of the non-target term (mdistiller's CIFAR-100 default).",
                              search="b", panel="Distillation")
    # Huang et al. (2022) set beta = gamma = 1
    dist_gamma: float = setting(1.0, "dist: weight of the intra-class term relative to the inter-class one.",
                                search="g", panel="Distillation")
    allow_changed_data: bool = setting(False, "Train although images changed since the cache was built "
                                              "(recorded in run.json).", flags=("--allow-changed-data",), panel="Data")
    # the validated recipe: the guide's learns slowly from scratch (docs/results.md §3; issue 57)
    recipe: str = setting(DEFAULT_RECIPE, "Named preset of the settings marked 'the recipe's': kdpipe (validated on Beans: "
                                    f"{describe_recipe('kdpipe')}) | guide (the Transformers guide exactly: "
                                    f"{describe_recipe('guide')}) | {BEFORE_RECIPES} (kdpipe's defaults until "
                                    "recipes existed). A flag overrides one of its values.", panel="Optimisation")
    # the settings the recipe set (no flag did), recorded in run.json; kept through dataclasses.replace
    from_recipe: list[str] | None = setting(None, cli=False)
    # off, as for cache-teacher: an entry naming a file outside the dataset is read by nobody's intent
    allow_outside_images: bool = setting(False, "Read image files that dataset entries name outside the dataset's "
                                                "folder (recorded in run.json).", flags=("--allow-outside-images",),
                                         panel="Data")
    # off: a class never seen in training, or an image taught as two classes, is a data error until said otherwise
    allow_label_issues: bool = setting(False, "Train although a class has no training image or one image carries "
                                              "two labels (recorded in run.json).", flags=("--allow-label-issues",),
                                       panel="Data")
    # the run
    seed: int = setting(0, "Seed for init, data order and views.", panel="Run")
    precision: str = setting("auto", "auto|fp32|bf16|fp16 (auto: bf16 where the hardware is fast at it, else fp32).",
                             panel="Run")
    device: str = setting("auto", "auto|cpu|cuda.", panel="Run")
    compile: bool = setting(False, "torch.compile the student (2-core CPU: 1.08x per step after ~76 s compiling; see "
                                   "docs/benchmarks.md).", flags=("--compile",), panel="Run")
    out: Path | None = setting(None, "Run folder.", shown="data/runs/<name>", panel="Run")
    name: str | None = setting(None, "Run name.", shown="from the settings", panel="Run")
    resume: bool = setting(False, "Continue an interrupted run from its last epoch.", flags=("--resume",), panel="Run")
    log_tensorboard: bool = setting(True, "TensorBoard events in the run folder (with the tensorboard extra).",
                                    cli=False)

    def __post_init__(self):
        self._apply_recipe()
        _finite_floats(self)
        if self.cache is not None:
            self.cache = Path(self.cache)
        if self.out is not None:
            self.out = Path(self.out)
        _plain_name(self.name, "--name", DATA_ROOT / "runs")
        _positive("temperature", self.temperature, "--temperature")
        _check(0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1] (got {self.alpha})")
        _check(self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)} (got {self.loss!r})")
        _check(not self.standardize or LOSSES[self.loss].standardizable,
               f"--standardize applies to --loss {' or '.join(standardizable())} (Sun et al. 2024), not --loss {self.loss}")
        _finite_at_least("dkd_beta", self.dkd_beta, "--dkd-beta")
        _finite_at_least("dist_gamma", self.dist_gamma, "--dist-gamma")
        _check(self.alpha == 0 or self.cache is not None,
               "--cache is required when --alpha > 0 (the KD term needs teacher logits); use --alpha 0 for a "
               "from-scratch baseline")
        _check(self.cache is not None or self.dataset is not None, "pass --cache, or --dataset with --alpha 0")
        _positive("lr", self.lr, "--lr")
        _positive("batch_size", self.batch_size, "--batch-size")
        _positive("epochs", self.epochs, "--epochs")
        _check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _check(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}")
        _check(self.best_epoch in BEST_EPOCH_RULES,
               f"--best-epoch must be one of {', '.join(BEST_EPOCH_RULES)} (got {self.best_epoch!r})")
        _check(0.0 <= self.warmup_ratio < 1.0, "--warmup-ratio must be in [0, 1)")
        _check(self.bn_momentum is None or 0.0 < self.bn_momentum <= 1.0,
               "--bn-momentum must be in (0, 1] (PyTorch semantics: weight of the newest batch)")
        _check(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
        _check(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}")
        _check(self.eval_size is None or (isinstance(self.eval_size, int) and self.eval_size > 0),
               f"--eval-size must be a positive number of pixels (got {self.eval_size})")
        _check(self.val_split != self.train_split,
               f"--val-split {self.val_split} is also --train-split: the best epoch would be chosen on the images it "
               "trained on; pass a held-out split")
        _check(self.test_split != self.train_split,
               f"--test-split {self.test_split} is also --train-split: the test score would be measured on trained "
               "images; pass a held-out split, or --test-split '' for none")

    def _apply_recipe(self) -> None:
        """Settings left None take the recipe's value; from_recipe names them (and keeps, from a config this one
        was copied from, those still at the recipe's value)."""
        _check(self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)} (got {self.recipe!r})")
        preset, earlier = RECIPES[self.recipe], set(self.from_recipe or ())
        taken = set()
        for name, value in preset.items():
            if name == "student_config":
                continue
            if getattr(self, name) is None:
                setattr(self, name, value)
                taken.add(name)
            elif name in earlier and getattr(self, name) == value:
                taken.add(name)
        self.student_config = dict(self.student_config)
        for key, value in preset["student_config"].items() if self.student is None else ():
            name = f"student_config.{key}"
            if key not in self.student_config:
                self.student_config[key] = value
                taken.add(name)
            elif name in earlier and self.student_config[key] == value:
                taken.add(name)
        self.from_recipe = sorted(taken)

    def as_started(self, saved: dict | None) -> "TrainConfig":
        """This config for resuming a run or sweep started with the settings `saved` (None: none started): one
        started before recipes existed, resumed without --recipe, takes the defaults of then for the settings
        no flag gives."""
        old = saved is not None and "recipe" not in saved and self.recipe == DEFAULT_RECIPE
        return self.under_recipe(BEFORE_RECIPES) if old else self

    def under_recipe(self, recipe: str) -> "TrainConfig":
        """The same flags under another recipe: every setting the recipe set takes the other recipe's value."""
        reset = {name: None for name in self.from_recipe if "." not in name}
        own = {k: v for k, v in self.student_config.items() if f"student_config.{k}" not in self.from_recipe}
        return replace(self, recipe=recipe, student_config=own, from_recipe=None, **reset)

    def run_name(self) -> str:
        if self.name:
            return self.name
        arm = "scratch" if self.alpha == 0 else f"kd-T{self.temperature:g}-a{self.alpha:g}"
        return f"{arm}-lr{self.lr:g}-bs{self.batch_size}-e{self.epochs}-s{self.seed}"

    def out_dir(self) -> Path:
        return self.out or DATA_ROOT / "runs" / self.run_name()

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# Settings a later kdpipe removed, each with the value that did what kdpipe does now without it: the batch-level
# --mix (two cached answers mixed: an approximation the mixed views replace) and the online --augment flip (a
# student input the cached teacher never saw). (TrainConfig.workers, never read, was removed too: any value
# did what kdpipe does now, so it is not compared.)
REMOVED = {"mix": "none", "mix_alpha": 1.0, "augment": "none", "allow_inconsistent": False}


# Settings added since whose default is not what an earlier kdpipe did, each with the value that is: a run or sweep
# started before one of them resumes at that value as well as at the default (the best epoch of tied ones was the
# first until --best-epoch; a checkpoint of then keeps only that epoch's weights, train_student.resume).
EARLIER = {"best_epoch": "first"}


def comparable(now: dict, saved: dict) -> dict:
    """`now` (a TrainConfig.to_dict(), or part of one) as the kdpipe that wrote `saved` would have written it:
    less the settings `saved` lacks that hold their default (added since; their default is what the earlier
    kdpipe did) or their EARLIER value, plus the removed settings `saved` has, at the value that means what kdpipe does now. So runs
    and sweeps started before an upgrade resume, and one that used a removed setting differs in it. One started
    before recipes resumes under the recipe `before-recipes` (train_student.run, sweep.run: the defaults then)."""
    implicit = set(now.get("from_recipe") or ())
    now = {k: v for k, v in now.items() if k != "from_recipe"}  # which settings flags gave: the values are compared
    if "from_recipe" in saved:
        now["from_recipe"] = saved["from_recipe"]
    if "recipe" not in saved and now.get("recipe") == BEFORE_RECIPES:  # started before recipes, resumed as it was
        del now["recipe"]
        if "student_config" in now:  # what that kdpipe left implicit (224 px) it did not write
            now["student_config"] = {k: v for k, v in now["student_config"].items()
                                     if f"student_config.{k}" not in implicit}
    out = {k: v for k, v in now.items()
           if k in saved or k not in TRAIN_DEFAULTS or v not in (TRAIN_DEFAULTS[k], EARLIER.get(k, TRAIN_DEFAULTS[k]))}
    return {**out, **{k: v for k, v in REMOVED.items() if k in saved}}


# Train-student settings a sweep can search (`setting(search=...)`), in field order, with their types.
SWEEPABLE = {f.name: value_type(TrainConfig, f.name) for f in fields(TrainConfig) if f.metadata["search"] is not None}
def applicable(params: dict, base: TrainConfig) -> dict:
    """`params` (searched settings of one config) less those that change nothing in it: with alpha = 0 the
    temperature, the loss and its settings (there is no KD term); otherwise the settings of other losses."""
    own = own_settings()  # setting -> the losses it applies to (loss.LOSSES)
    if params.get("alpha", base.alpha) == 0:
        return {k: v for k, v in params.items() if k not in ("temperature", "loss", *own)}
    loss = params.get("loss", base.loss)
    return {k: v for k, v in params.items() if k not in own or loss in own[k]}


SAMPLERS = ("grid", "tpe")
PRUNERS = ("none", "median", "halving")
# Trials (configs x seeds) a grid may hold without --large-grid: beyond any sweep these machines finish (the
# quickest trial takes seconds), and a mistyped list (2,000 values of --lr) is caught before anything runs
GRID_LIMIT = 10_000


def grid_size(dims: dict, base: TrainConfig) -> int:
    """How many configs a grid over `dims` holds (sweep.grid_points yields them), counted without enumerating
    them: alpha = 0 once per setting of the rest (no temperature, loss or loss setting), every other alpha
    once per temperature, loss and that loss's own settings (applicable)."""
    def product(names) -> int:
        return math.prod(len(dims[n].choices) for n in names if n in dims)

    own = own_settings()
    rest = product(n for n in dims if n not in ("alpha", "temperature", "loss", *own))
    alphas = dims["alpha"].choices if "alpha" in dims else (base.alpha,)
    losses = dims["loss"].choices if "loss" in dims else (base.loss,)
    distilled = sum(product(["temperature", *(n for n in own if loss in own[n])]) for loss in losses)
    return sum(rest * (1 if alpha == 0 else distilled) for alpha in alphas)


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
    train: TrainConfig = setting(cli=False)  # everything not searched; out/seed/name/resume are per trial
    space: dict[str, str] = setting(factory=dict, cli=False)  # setting -> "1,2,5" or "1e-5:1e-2:log" (as typed)
    # a claim needs a spread; 3 is the minimum
    seeds: list[int] = setting(help="Seeds; every config runs every seed.", factory=lambda: [0, 1, 2], parse=ints)
    sampler: str = setting("grid", "grid (every config x seed) or tpe (Optuna's TPE, --trials configs).")
    trials: int | None = setting(None, "tpe: how many configs to try.")
    prune: str = setting("none", "none|median|halving: stop hopeless trials on per-epoch validation accuracy.")
    storage: str | None = setting(None, "Optuna storage URL for many workers.", shown="a journal file in --out")
    out: Path | None = setting(None, "Sweep folder.", shown="data/sweeps/<name>")
    name: str | None = setting(None, "Study name.", shown="the folder's name")
    stale_after_s: float = setting(3600.0, "Seconds of silence after which another host's trial is rerun.",
                                   flags=("--stale-after",))
    # off: a grid above GRID_LIMIT is more often a mistyped list than a plan
    large_grid: bool = setting(False, f"Run a grid of more than {GRID_LIMIT:,} trials (configs x seeds); recorded in "
                                      "sweep.json.", flags=("--large-grid",))
    # no limit: a worker runs until the sweep has no trial left to start, as before --hours existed
    hours: float | None = setting(None, "This worker starts only trials it can finish within H hours, judged from "
                                  "the pace measured on this kind of machine.", shown="no limit")
    # a database restart takes seconds and a failover a minute or two; past 10 minutes a person should look
    storage_wait_s: float = setting(600.0, "Seconds a worker waits for an unreachable --storage before it stops.",
                                    flags=("--storage-wait",))
    dims: dict = field(init=False, repr=False, compare=False)  # the space, parsed once: name -> Dimension
    grid_trials: int | None = field(init=False, repr=False, compare=False)  # configs x seeds of a grid (None: tpe)

    @classmethod
    def from_flags(cls, train: dict, **sweep) -> "SweepConfig":
        """A sweep from train-student settings as typed (`train`: a searchable one as text, "1,2,5" or a range,
        None when not given; any other as its value) and the sweep's own settings. A searchable setting with
        one value is fixed for every run (it stays out of config names); more values or a range are searched."""
        fixed, space = {}, {}
        for name in SWEEPABLE:
            text = train.pop(name, None)
            if text is None:
                continue
            dim = parse_dimension(name, text)
            if len(dim.choices) == 1:
                fixed[name] = dim.choices[0]
            else:
                space[name] = text
        if "alpha" in space and train.get("cache") is None:  # checked below, over every searched alpha
            fixed["alpha"] = 0.0
        return cls(train=TrainConfig(**train, **fixed), space=space, **sweep)

    def __post_init__(self):
        _finite_floats(self)
        if self.out is not None:
            self.out = Path(self.out)
        _plain_name(self.name, "--name", DATA_ROOT / "sweeps")
        _check(self.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}")
        _check(self.prune in PRUNERS, f"--prune must be one of {', '.join(PRUNERS)}")
        _check(bool(self.seeds), "--seeds: give at least one seed, e.g. 0,1,2")
        _check(len(set(self.seeds)) == len(self.seeds), f"--seeds: repeated seed in {self.seeds}")
        unknown = set(self.space) - set(SWEEPABLE)
        _check(not unknown, f"cannot sweep {sorted(unknown)}; searchable: {', '.join(SWEEPABLE)}")
        self.dims = dims = {name: parse_dimension(name, text) for name, text in self.space.items()}
        if self.sampler == "grid":
            ranged = [d.name for d in dims.values() if d.is_range]
            _check(not ranged, f"--{ranged[0].replace('_', '-') if ranged else ''}: ranges need --sampler tpe; "
                               "a grid takes lists like 1,2,5")
            _check(self.trials is None, "--trials is for --sampler tpe; a grid runs every config")
            configs = grid_size(dims, self.train)
            self.grid_trials = configs * len(self.seeds)
            _check(self.grid_trials <= GRID_LIMIT or self.large_grid,
                   f"the grid holds {self.grid_trials:,} trials ({configs:,} configs x {len(self.seeds)} seeds), more "
                   f"than {GRID_LIMIT:,}: give fewer values, use --sampler tpe --trials N, or pass --large-grid to run "
                   "it all")
        else:
            self.grid_trials = None
            _check(self.trials is not None and self.trials > 0, "--sampler tpe needs --trials N (N > 0)")
            _check(bool(dims), "--sampler tpe needs at least one searched setting, e.g. --lr 1e-5:1e-2:log")
        losses = dims["loss"].choices if "loss" in dims else (self.train.loss,)
        plain = [loss for loss in losses if not LOSSES[loss].standardizable]
        _check(not (self.train.standardize and plain),
               f"--standardize true does not apply to --loss {' or '.join(plain)}; search --standardize true,false "
               f"instead ({' and '.join(plain)} configs run without it)")
        alpha = dims.get("alpha")
        alphas = (self.train.alpha,) if alpha is None else alpha.choices or (alpha.low, alpha.high)
        _check(self.train.cache is not None or max(alphas) == 0,
               "--cache is required when --alpha is > 0 (the KD term needs teacher logits)")
        _check(self.stale_after_s > 0, "--stale-after must be > 0 seconds")
        _check(self.hours is None or self.hours > 0, "--hours must be > 0 (leave it out for no limit)")
        _check(self.storage_wait_s >= 0, "--storage-wait must be >= 0 seconds")

    def out_dir(self) -> Path:
        return self.out or DATA_ROOT / "sweeps" / (self.name or "sweep")

    def study_name(self) -> str:
        return self.name or self.out_dir().resolve().name

    def spec(self) -> dict:
        """What makes two workers part of the same sweep (compared when a worker joins)."""
        train = self.train.to_dict()
        for k in ("out", "name", "seed", "resume", "device", "workers", *self.space):
            train.pop(k, None)
        return {"space": {k: d.to_dict() for k, d in self.dims.items()}, "seeds": list(self.seeds),
                "sampler": self.sampler, "trials": self.trials, "prune": self.prune, "train": train}
