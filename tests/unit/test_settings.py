"""One place per setting (issue 27, point 3): the command line is built from the config dataclasses, so a
setting's default, help, flags and parser live in its field; a new field is a new option without other edits."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import typer
from typer.testing import CliRunner

from kdpipe import cli, run_folder, settings
from kdpipe.config import REMOVED, SWEEPABLE, CacheConfig, SweepConfig, TrainConfig, comparable
from kdpipe.errors import KdpipeError
from kdpipe.sweep import SHORT, config_key


@dataclasses.dataclass
class Toy:
    rate: float = settings.setting(0.1, "A rate.", flags=("--rate", "-r"), search="r")
    tags: list[str] = settings.setting(help="Tags.", factory=lambda: ["a"], parse=settings.comma_list)
    loud: bool = settings.setting(False, "Be loud.", flags=("--loud/--quiet",))

    def __post_init__(self):
        if self.rate <= 0:
            raise KdpipeError(f"--rate must be > 0 (got {self.rate})")


def _toy_app():
    app = typer.Typer()

    @app.command()
    @cli.configured(flags=Toy)
    def go(flags: dict):
        print(repr(Toy(**flags)))

    return app


@pytest.mark.parametrize("args, expected", [([], Toy()), (["-r", "0.5", "--tags", "x,y", "--loud"],
                                                         Toy(0.5, ["x", "y"], True))])
def test_a_new_field_is_a_new_option_with_its_default_parser_and_check(args, expected):
    result = CliRunner().invoke(_toy_app(), args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == repr(expected)
    refused = CliRunner().invoke(_toy_app(), ["--rate", "0"])
    assert refused.exit_code == 1 and "--rate must be > 0" in refused.output and "Traceback" not in refused.output


def _options(command) -> dict:
    callback = next(c.callback for c in cli.app.registered_commands if c.name == command)
    return {name: p.default for name, p in inspect.signature(callback).parameters.items()}


@pytest.mark.parametrize("command, cls", [("train-student", TrainConfig), ("cache-teacher", CacheConfig)])
def test_every_option_is_a_config_field_with_the_fields_default(command, cls):
    options = _options(command)
    for f in dataclasses.fields(cls):
        if not f.metadata["cli"] or dataclasses.is_dataclass(settings.value_type(cls, f.name)):
            continue
        info = options.pop(f.name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.metadata["parse"] is None:
            assert info.default == default, f.name
        assert info.help == f.metadata["help"], f.name
    nested = {k for k in options if "__" in k}  # CacheConfig.augment: the ViewPolicy fields
    assert set(options) == nested
    assert not set(options) - {f"augment__{f.name}" for f in dataclasses.fields(CacheConfig().augment)}


def test_the_sweep_offers_every_train_setting_and_searches_the_marked_ones():
    options = _options("sweep")
    per_trial = {"out", "name", "seed", "resume"}
    train = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]} - per_trial
    own = {f.name for f in dataclasses.fields(SweepConfig) if f.init and f.metadata["cli"]}
    assert set(options) == train | own | {"plan"}  # --plan FILE: a study plan instead (plan.PlanOption)
    for name in SWEEPABLE:
        assert options[name].default is None and cli.SEARCHABLE in options[name].help  # text: values or a range
        assert not any("/" in d for d in options[name].param_decls)  # --standardize true,false, not a switch


def test_sweep_flags_split_into_fixed_settings_and_searched_ones():
    cfg = SweepConfig.from_flags({"cache": ".", "temperature": "2,5", "lr": "1e-3", "alpha": None}, seeds=[0])
    assert cfg.space == {"temperature": "2,5"} and cfg.train.lr == 1e-3 and cfg.train.alpha == 0.5
    assert list(cfg.dims) == ["temperature"] and cfg.dims["temperature"].choices == (2.0, 5.0)
    scratch = SweepConfig.from_flags({"dataset": ".", "lr": "1e-3,1e-2", "alpha": "0"}, seeds=[0])  # no cache
    assert scratch.train.alpha == 0.0 and scratch.space == {"lr": "1e-3,1e-2"}
    with pytest.raises(KdpipeError, match="--cache is required"):  # searching alpha > 0 needs teacher logits
        SweepConfig.from_flags({"dataset": ".", "alpha": "0,0.5"}, seeds=[0])


def test_config_names_keep_their_order():
    """A sweep's trials are keyed by config names; reordering TrainConfig's searchable fields would rename the
    configs of every sweep already on disk, so their order is pinned here."""
    assert list(SHORT) == ["temperature", "alpha", "lr", "batch_size", "epochs", "weight_decay", "warmup_ratio",
                           "schedule", "bn_momentum", "loss", "standardize", "dkd_beta", "dist_gamma"]
    assert config_key({"loss": "dkd", "temperature": 4.0, "dkd_beta": 8.0, "alpha": 0.5, "standardize": True}) == \
        "T4-a0.5-dkd-ls1-b8"


def test_settings_added_later_at_their_default_do_not_block_a_resume():
    now = TrainConfig(cache=".", seed=3).to_dict()
    older = {k: v for k, v in now.items() if k not in ("loss", "dkd_beta")}  # written before --loss existed
    assert comparable(now, older) == older
    changed = TrainConfig(cache=".", seed=3, loss="dkd").to_dict()
    assert comparable(changed, older)["loss"] == "dkd"  # a setting really changed still differs


@pytest.mark.parametrize("removed, value, resumes", [("mix", "none", True), ("mix", "cutmix", False),
                                                    ("augment", "flip", False), ("workers", 2, True)])
def test_a_run_that_used_a_removed_setting_is_refused_on_resume(tmp_path, removed, value, resumes):
    cfg = TrainConfig(cache=".", seed=3, resume=True)
    saved = {**cfg.to_dict(), **REMOVED, removed: value}  # run.json of a kdpipe that had the setting
    if resumes:
        run_folder.refuse_other_settings(cfg, saved, tmp_path)
    else:
        with pytest.raises(KdpipeError, match=f"other settings \\({removed}\\)"):
            run_folder.refuse_other_settings(cfg, saved, tmp_path)


def test_the_default_recipe_is_the_one_validated_on_beans_and_guide_is_the_guide():
    """Issue 57, point 2: the guide's settings learn slowly from scratch; the default is the validated recipe."""
    cfg = TrainConfig(cache=".")
    assert (cfg.recipe, cfg.lr, cfg.batch_size, cfg.epochs, cfg.schedule, cfg.warmup_ratio, cfg.weight_decay,
            cfg.bn_momentum, cfg.student_config) == ("kdpipe", 3e-3, 32, 15, "cosine", 0.05, 0.05, 0.1,
                                                     {"classifier_dropout_prob": 0.2})
    guide = TrainConfig(cache=".", recipe="guide")
    assert (guide.lr, guide.batch_size, guide.epochs, guide.schedule, guide.warmup_ratio, guide.weight_decay,
            guide.bn_momentum, guide.student_config) == (5e-5, 8, 30, "linear", 0.0, 0.0, 0.997, {})
    for c in (cfg, guide):  # the loss keeps the guide's T and lambda whatever the recipe
        assert (c.temperature, c.alpha) == (5.0, 0.5)


def test_a_flag_overrides_one_value_of_the_recipe_and_the_record_says_which():
    cfg = TrainConfig(cache=".", recipe="guide", lr=1e-3, student_config={"classifier_dropout_prob": 0.5})
    assert (cfg.lr, cfg.batch_size, cfg.student_config) == (1e-3, 8, {"classifier_dropout_prob": 0.5})
    record = cfg.to_dict()
    assert record["recipe"] == "guide" and record["lr"] == 1e-3 and record["epochs"] == 30
    assert "lr" not in record["from_recipe"] and "epochs" in record["from_recipe"]
    mine = TrainConfig(cache=".", student_config={"classifier_dropout_prob": 0.5}).to_dict()
    assert mine["student_config"] == {"classifier_dropout_prob": 0.5}
    assert "student_config.classifier_dropout_prob" not in mine["from_recipe"]
    # another student's config may lack the recipe's dropout field: the recipe adds it to MobileNetV2 only
    assert TrainConfig(cache=".", student="some/checkpoint").student_config == {}
    with pytest.raises(KdpipeError, match="--recipe must be one of kdpipe, guide"):
        TrainConfig(cache=".", recipe="fast")


def test_the_recipe_is_an_option_of_train_student_and_sweep_listed_in_help():
    for command in ("train-student", "sweep"):
        out = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "400"}).output
        assert "--recipe" in out and "guide" in out and "lr 0.003" in out, command


def now_size(cfg: TrainConfig):
    return cfg.student_config.get("image_size")


def test_a_run_started_before_recipes_resumes_with_the_defaults_it_started_with(tmp_path):
    old = TrainConfig(cache=".", seed=3, recipe="before-recipes").to_dict()
    saved = {k: v for k, v in old.items() if k not in ("recipe", "from_recipe")}  # what that kdpipe wrote:
    saved["student_config"] = {}  # MobileNetV2's 224 px was its config's default, not a flag
    assert (saved["lr"], saved["batch_size"], saved["bn_momentum"]) == (5e-5, 8, 0.1)
    assert now_size(TrainConfig(cache=".").under_recipe("before-recipes")) == 224  # not chosen from the data
    now = TrainConfig(cache=".", seed=3, resume=True)
    with pytest.raises(KdpipeError, match="other settings"):  # under today's default recipe the values differ
        run_folder.refuse_other_settings(now, saved, tmp_path)
    run_folder.refuse_other_settings(now.under_recipe("before-recipes"), saved, tmp_path)
    flagged = TrainConfig(cache=".", seed=3, resume=True, lr=1e-3).under_recipe("before-recipes")
    assert flagged.lr == 1e-3 and flagged.batch_size == 8  # a flag still wins over the old defaults
    with pytest.raises(KdpipeError, match=r"other settings \(lr\)"):
        run_folder.refuse_other_settings(flagged, saved, tmp_path)
