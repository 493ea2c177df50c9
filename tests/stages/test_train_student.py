"""Stage two: `kdpipe train-student` and `kdpipe evaluate` on tiny generated data."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.helpers import CLASSES, TINY_STUDENT, tiny_train_config, write_split
from kdpipe import evaluate, files, logit_store, metrics, pixels, run_folder, train_student
from kdpipe.config import TrainConfig
from kdpipe.data import open_dataset
from kdpipe.errors import KdpipeError
from kdpipe.student import batchnorm_layers


def test_a_student_learns_separable_data(image_folder, tmp_path):
    """Learning shown with a margin that holds over seeds, instruction sets and thread counts. Full-batch steps
    (36 images, 20 steps) keep BatchNorm's batch statistics close to the population's, so validation follows the
    training fit; with batches of 8 the old version of this run reached 0.67-1.0 by seed and CPU (0.75 on an
    AVX2 machine failed its 0.8 bar). Measured for this one: seeds 0-7 on AVX2 kernels and one thread, best
    validation 10-12 of 12 and a last loss under 0.6 % of the first; seed 0 on AVX-512 and 2 threads, 12 of 12.
    The bars: 7 of 12 (chance is 4; the worst seed is 3 above) and a tenth of the first loss."""
    report = train_student.run(tiny_train_config(dataset=str(image_folder), alpha=0.0, epochs=20, lr=3e-3,
                                                 batch_size=36, precise_bn=True, out=tmp_path / "run"))
    losses = [r["train"]["loss"] for r in report.history]
    assert report.validation["accuracy"] >= 7 / 12
    assert losses[-1] < 0.1 * losses[0]
    assert {"accuracy", "macro_f1", "nll"} <= set(report.validation) and report.validation["nll"] >= 0
    assert np.array(report.confusion_matrix).sum() == 12


def test_outputs_and_provenance(cache_dir, tmp_path):
    report = train_student.run(tiny_train_config(cache=cache_dir, epochs=2, out=tmp_path / "run"))
    out = tmp_path / "run"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert {"loss", "ce", "kd"} == set(json.loads(lines[0])["train"])
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["seed"] == 0 and run["config"]["alpha"] == 0.5
    assert run["cache"]["teacher"]["label_names"] == CLASSES and run["cache_matches_dataset_contents"]
    assert run["best_epoch"] == report.best_epoch and len(run["epoch_time_s"]) == 2
    assert {"torch", "transformers"} <= set(run["versions"]) and run["train_images_per_s"] > 0
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "preprocessor_config.json").exists()
    assert not (out / "checkpoint.pt").exists()  # a finished run keeps only its result


def test_the_chosen_epoch_keeps_its_predictions_per_image(cache_dir, image_folder, tmp_path):
    report = train_student.run(tiny_train_config(cache=cache_dir, epochs=2, out=tmp_path / "run"))
    out = tmp_path / "run"
    dataset = open_dataset(str(image_folder))
    for split, reported in (("validation", report.validation), ("test", report.test)):
        kept = run_folder.read_predictions(out, split)
        source = dataset.splits[split]
        assert kept.ids == source.ids and np.array_equal(kept.labels, source.labels) and kept.labels.dtype == np.int64
        assert kept.logits.shape == (len(source.ids), len(CLASSES)) and kept.logits.dtype == np.float32
        assert kept.epoch == report.best_epoch
        assert kept.correct.mean() == reported["accuracy"]  # the logits the reported accuracy was measured on
        assert report.run["predictions"][split] == files.sha256(out / "predictions" / f"{split}.parquet")
        table = pq.read_table(out / "predictions" / f"{split}.parquet")
        assert [str(t) for t in table.schema.types] == ["string", "int64", "list<element: float>"]
        meta = json.loads(table.schema.metadata[b"kdpipe"])
        assert {k: meta[k] for k in ("split", "epoch", "n", "num_labels")} == \
            {"split": split, "epoch": report.best_epoch, "n": len(source.ids), "num_labels": 3}
        assert meta["best_epoch_rule"] and meta["dataset_fingerprint"] == source.fingerprint()
    test = run_folder.read_predictions(out, "test")  # the student reloaded alone gives the same logits
    again = evaluate.saved(out, split="test", device="cpu")
    assert again["nll"] == pytest.approx(metrics.nll(test.logits, test.labels), rel=1e-5)
    with pytest.raises(KdpipeError, match="missing"):
        run_folder.read_predictions(out, "train")
    (out / "predictions" / "test.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(KdpipeError, match="damaged"):
        run_folder.read_predictions(out, "test")


def test_the_best_epoch_rules_by_hand():
    # validation accuracy 0.5, 0.9, 0.9, 0.8, 0.9: three epochs tie on 0.9
    history = [{"accuracy": a, "nll": n} for a, n in ((0.5, 1.0), (0.9, 0.3), (0.9, 0.2), (0.8, 0.1), (0.9, 0.2))]
    assert metrics.tied_epochs(history) == 3
    assert metrics.best_epoch(history, "first") == 2
    assert metrics.best_epoch(history, "nll") == 5  # epochs 3 and 5 tie on NLL too: the later
    history[4]["nll"] = float("nan")  # a non-finite (or missing) NLL ranks last among the tied
    assert metrics.best_epoch(history, "nll") == 3
    assert metrics.best_epoch(history[:1], "nll") == metrics.best_epoch(history[:1], "first") == 1


@pytest.fixture
def tied_validation(monkeypatch):
    """Every epoch ties on validation accuracy, and validation NLL falls epoch by epoch, whatever the CPU: the
    nll rule chooses the last epoch, the first rule the first (training itself is untouched)."""
    real = train_student.evaluate_split

    def evaluate_split(s, name):
        report, logits = real(s, name)
        if name == s.cfg.val_split:
            report = {**report, "accuracy": 0.5, "nll": 10.0 - len(s.history)}
        return report, logits

    monkeypatch.setattr(train_student, "evaluate_split", evaluate_split)


class Stop(Exception):
    pass


def _stop_after(epoch: int):
    def on_epoch(record):
        if record["epoch"] == epoch:
            raise Stop
    return on_epoch


def test_tied_epochs_are_broken_by_nll_and_the_other_rule_is_tested_beside(tied_validation, cache_dir, tmp_path):
    nll = train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=tmp_path / "nll"))
    first = train_student.run(tiny_train_config(cache=cache_dir, epochs=3, best_epoch="first", out=tmp_path / "first"))
    assert (nll.best_epoch, first.best_epoch) == (3, 1)
    assert nll.run["best_epoch_rule"] == {"rule": "nll", "epoch": 3, "tied": 3, "other_rule": "first",
                                          "other_rule_epoch": 1, "test_at_other_rule_epoch": first.test}
    assert first.run["best_epoch_rule"] == {"rule": "first", "epoch": 1, "tied": 3, "other_rule": "nll",
                                            "other_rule_epoch": 3, "test_at_other_rule_epoch": nll.test}
    assert run_folder.read_predictions(nll.out, "test").epoch == 3
    assert json.loads(pq.read_schema(nll.out / "predictions" / "test.parquet").metadata[b"kdpipe"])["best_epoch_rule"] == "nll"
    card = (nll.out / "model" / "README.md").read_text()
    assert "3 (3 epochs tied on validation accuracy; kept: the lowest validation NLL of them)" in card
    # a resumed run keeps the other rule's weights across the interruption (epoch 1's, in the checkpoint)
    with pytest.raises(Stop):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=tmp_path / "cut"), on_epoch=_stop_after(2))
    resumed = train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=tmp_path / "cut", resume=True))
    assert resumed.run["best_epoch_rule"] == nll.run["best_epoch_rule"] and resumed.test == nll.test


def test_a_checkpoint_from_before_the_rules_finishes_with_the_first_rule(tied_validation, cache_dir, tmp_path):
    """A checkpoint written before --best-epoch kept only the first best epoch's weights: resumed with the nll
    rule, whose epoch's weights it lacks, the run stops with a one-line fix; with --best-epoch first it finishes
    without training again (the resume accepts the rule the run was started under)."""
    out = tmp_path / "old"
    with pytest.raises(Stop):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=out), on_epoch=_stop_after(3))
    state = run_folder.read_checkpoint(out / "checkpoint.pt")
    best = state.pop("best")["first"]
    state.update(best_epoch=best["epoch"], best_accuracy=0.5, best_state=best["state"])
    del state["config"]["best_epoch"]
    run_folder.write_checkpoint(out, state, json.loads(state["history"]))
    with pytest.raises(KdpipeError, match="--resume --best-epoch first"):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=out, resume=True))
    done = train_student.run(tiny_train_config(cache=cache_dir, epochs=3, best_epoch="first", out=out, resume=True))
    assert done.best_epoch == 1 and done.run["best_epoch_rule"]["test_at_other_rule_epoch"] is None
    assert done.run["best_epoch_rule"]["other_rule_epoch"] == 3


def test_the_saved_student_loads_with_auto_classes_and_pipeline(cache_dir, image_folder, tmp_path):
    from transformers import AutoModelForImageClassification, pipeline

    train_student.run(tiny_train_config(cache=cache_dir, epochs=1, out=tmp_path / "run"))
    model_dir = tmp_path / "run" / "model"
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    assert model.config.id2label == dict(enumerate(CLASSES))
    image_path = next((image_folder / "test" / "healthy").iterdir())
    classify = pipeline("image-classification", model=str(model_dir), device="cpu")
    top = classify(Image.open(image_path))[0]
    # the pipeline's preprocessing is the one the student trained with: same prediction as our inputs
    split = open_dataset(str(image_folder), splits=["test"]).splits["test"]
    row = split.ids.index(image_path.relative_to(image_folder).as_posix())
    x = pixels.normalise(torch.from_numpy(np.stack([pixels.decode_resized(split, row, (32, 32), 2)])),
                         torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3]))
    with torch.no_grad():
        probs = model(pixel_values=x).logits.softmax(-1)[0]
    assert top["label"] == CLASSES[int(probs.argmax())]
    assert top["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_evaluate_reproduces_the_final_metrics(run_cli, cache_dir, tmp_path):
    report = train_student.run(tiny_train_config(cache=cache_dir, epochs=2, out=tmp_path / "run"))
    again = evaluate.saved(tmp_path / "run", split="test", device="cpu")
    assert again["accuracy"] == report.test["accuracy"]
    assert again["teacher_agreement"] == report.test["teacher_agreement"]
    assert again["kl_to_teacher"] == pytest.approx(report.test["kl_to_teacher"], rel=1e-5)
    assert again["confusion_matrix"] == report.confusion_matrix
    code, out = run_cli("evaluate", tmp_path / "run", "--split", "validation")
    assert code == 0 and f"accuracy {report.validation['accuracy']:.2%}" in out


def test_alpha_zero_trains_without_a_cache(run_cli, image_folder, tmp_path):
    code, out = run_cli("train-student", "--dataset", image_folder, "--alpha", "0", "--epochs", "1",
                        "--student-config", TINY_STUDENT, "--precision", "fp32", "--out", tmp_path / "r")
    assert code == 0, out
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert "cache" not in run and "teacher_agreement" not in run["validation"]
    code, out = run_cli("train-student", "--dataset", image_folder, "--epochs", "1", "--out", tmp_path / "r2")
    assert code == 1 and "--cache" in out and "--alpha 0" in out


def _rewrite_cache(src, dst, edit):
    """Copy a cache, changing one split through `edit(ids, labels, logits, meta)`; checksums stay valid."""
    shutil.copytree(src, dst)
    path = dst / "train.parquet"
    s = logit_store.read_split(path)
    ids, labels, logits, meta = edit(list(s.ids), s.labels.copy(), s.logits.copy(), dict(s.meta))
    for key in ("format", "format_version", "rows", "num_classes", "content_sha256"):
        meta.pop(key, None)
    write_split(path, ids, labels, logits, meta)
    return dst


def test_logits_are_joined_by_id_not_by_position(cache_dir, tmp_path):
    """A cache with its rows shuffled trains exactly like the original."""
    def shuffle(ids, labels, logits, meta):
        order = np.random.default_rng(0).permutation(len(ids))
        return [ids[i] for i in order], labels[order], logits[order], meta

    shuffled = _rewrite_cache(cache_dir, tmp_path / "shuffled", shuffle)
    a = train_student.setup(tiny_train_config(cache=cache_dir, out=tmp_path / "a"))
    b = train_student.setup(tiny_train_config(cache=shuffled, out=tmp_path / "b"))
    assert torch.equal(a.splits["train"].teacher_logits, b.splits["train"].teacher_logits)


@pytest.mark.parametrize("edit, message", [
    (lambda ids, l, x, m: (ids[1:], l[1:], x[1:], m), "missing from the cache"),
    (lambda ids, l, x, m: (ids[:-1] + ["train/healthy/impostor.png"], l, x, m), "extra ids"),
    (lambda ids, l, x, m: (ids, (l + 1) % 3, x, m), "other labels"),
])
def test_a_mismatched_cache_is_refused(run_cli, cache_dir, tmp_path, edit, message):
    bad = _rewrite_cache(cache_dir, tmp_path / "bad", edit)
    code, out = run_cli("train-student", "--cache", bad, "--epochs", "1", "--student-config", TINY_STUDENT,
                        "--out", tmp_path / "r")
    assert code == 1 and message in out and "Traceback" not in out


def test_a_cache_with_other_label_names_is_refused(cache_dir, tmp_path):
    def rename(ids, labels, logits, meta):
        return ids, labels, logits, {**meta, "label_names": ["a", "b", "c"]}

    bad = _rewrite_cache(cache_dir, tmp_path / "bad", rename)
    with pytest.raises(KdpipeError, match="other teacher or label set|labels"):
        train_student.setup(tiny_train_config(cache=bad, out=tmp_path / "r"))


def test_resume_after_an_interruption_matches_an_uninterrupted_run(cache_dir, tmp_path):
    full = train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=tmp_path / "full"))

    def slow_first_epoch(task, done, total, info=""):  # so that epoch 1 outlasts the resumed process's own time
        if task.startswith("epoch 1/") and done == 1:
            time.sleep(3)

    with pytest.raises(Stop):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=tmp_path / "cut"), progress=slow_first_epoch,
                          on_epoch=_stop_after(1))
    assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut" / "run.json").exists()
    with pytest.raises(KdpipeError, match="--resume"):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=tmp_path / "cut"))
    resumed = train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=tmp_path / "cut", resume=True))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(full.history, resumed.history):
        assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-5)
        assert a["validation"]["accuracy"] == b["validation"]["accuracy"]
    assert resumed.test["accuracy"] == full.test["accuracy"]
    for split in ("validation", "test"):  # the resumed run keeps the same per-image predictions
        a, b = run_folder.read_predictions(tmp_path / "full", split), run_folder.read_predictions(tmp_path / "cut", split)
        assert a.ids == b.ids and a.epoch == b.epoch and np.allclose(a.logits, b.logits, rtol=1e-4, atol=1e-5)
    # the run's total time counts the interrupted attempt's epoch too, not only the resumed process
    assert resumed.history[0]["epoch_time_s"] >= 3
    assert resumed.run["total_time_s"] >= sum(r["epoch_time_s"] for r in resumed.history)
    with pytest.raises(Stop):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=tmp_path / "lr"), on_epoch=_stop_after(1))
    with pytest.raises(KdpipeError, match="other settings"):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, lr=0.5, out=tmp_path / "lr", resume=True))


def test_tensorboard_events_mirror_metrics_jsonl_across_a_resume(cache_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    with pytest.raises(Stop):
        train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=out), on_epoch=_stop_after(1))
    # event files are named and read in order of their creation second: keep the three files apart
    time.sleep(1.1)
    with SummaryWriter(str(out / "tensorboard")) as stale:  # a crash after logging epoch 2, before its checkpoint
        stale.add_scalar("train/loss", 1e6, 2)
    time.sleep(1.1)
    report = train_student.run(tiny_train_config(cache=cache_dir, epochs=3, out=out, resume=True))
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    logged = {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}
    assert {"train/loss", "train/kd", "validation/accuracy", "validation/teacher_agreement", "lr"} <= set(logged)
    assert logged["train/loss"] == [(r["epoch"], pytest.approx(r["train"]["loss"])) for r in report.history]
    assert logged["validation/accuracy"] == [(r["epoch"], pytest.approx(r["validation"]["accuracy"]))
                                             for r in report.history]


def test_no_tensorboard_folder_when_switched_off(cache_dir, tmp_path):
    train_student.run(tiny_train_config(cache=cache_dir, epochs=1, out=tmp_path / "run", log_tensorboard=False))
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_an_existing_run_folder_is_not_overwritten(run_cli, cache_dir, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "precious.txt").write_text("keep me")
    code, out = run_cli("train-student", "--cache", cache_dir, "--out", tmp_path / "r", "--epochs", "1")
    assert code == 1 and "--resume" in out and (tmp_path / "r" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("flag, value, message", [
    ("--alpha", "1.5", "--alpha"), ("--temperature", "0", "--temperature"), ("--lr", "-1", "--lr"),
    ("--schedule", "zigzag", "--schedule"), ("--bn-momentum", "2", "--bn-momentum"),
    ("--student-config", "depth_multiplier", "--student-config"), ("--precision", "fp64", "--precision"),
])
def test_bad_flags_get_one_line_errors(run_cli, cache_dir, tmp_path, flag, value, message):
    code, out = run_cli("train-student", "--cache", cache_dir, flag, value, "--out", tmp_path / "r")
    assert code == 1 and message in out and "Traceback" not in out


def test_cli_end_to_end(run_cli, cache_dir, tmp_path):
    code, out = run_cli("train-student", "--cache", cache_dir, "--epochs", "2", "--student-config", TINY_STUDENT,
                        "--lr", "3e-3", "--precision", "fp32", "--out", tmp_path / "r", "--seed", "3")
    assert code == 0, out
    assert "best epoch" in out and "test confusion" in out and "val acc" in out
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["seed"] == 3


# --- BatchNorm statistics (issue 9) -------------------------------------------------------------------


def test_bn_momentum_reaches_every_batchnorm_layer(cache_dir, tmp_path):
    s = train_student.setup(tiny_train_config(cache=cache_dir, bn_momentum=0.05, out=tmp_path / "a"))
    layers = batchnorm_layers(s.model)
    assert len(layers) > 10 and all(m.momentum == 0.05 for m in layers)
    upstream = train_student.setup(tiny_train_config(cache=cache_dir, recipe="guide", out=tmp_path / "b"))
    assert all(m.momentum == 0.997 for m in batchnorm_layers(upstream.model))  # transformers' TF-style value


def test_precise_bn_sets_the_exact_statistics_of_the_training_activations(cache_dir, tmp_path):
    s = train_student.setup(tiny_train_config(cache=cache_dir, out=tmp_path / "a", batch_size=8))
    train_student.train_epoch(s, 0)  # move the weights away from init
    layers = batchnorm_layers(s.model)
    probes = {0: layers[0], 1: layers[len(layers) // 2], 2: layers[-1]}
    seen = {k: [] for k in probes}
    handles = [m.register_forward_pre_hook(lambda mod, args, k=k: seen[k].append(args[0].detach().double()))
               for k, m in probes.items()]
    train_student.recompute_bn_stats(s)
    for h in handles:
        h.remove()
    for k, m in probes.items():
        x = torch.cat(seen[k])  # (N, C, H, W): every training activation entering this layer
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        torch.testing.assert_close(m.running_mean.double(), flat.mean(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.running_var.double(), flat.var(1, unbiased=True), atol=1e-5, rtol=1e-4)
    assert sum(len(v) for v in seen.values()) == 3 * 5  # 36 images in batches of 8: every batch, once


def test_bn_settings_do_not_change_the_training_trajectory(cache_dir, tmp_path):
    """BN running statistics only matter in eval mode, and precise BN runs under fork_rng: the weights
    after training are identical whatever the BN settings (the basis of the BN study in benchmarks/)."""
    runs = []
    for i, kw in enumerate([{"bn_momentum": 0.997}, {"bn_momentum": 0.1}, {"bn_momentum": 0.1, "precise_bn": True}]):
        s = train_student.setup(tiny_train_config(cache=cache_dir, out=tmp_path / str(i), **kw))
        train_student.fit(s)
        runs.append({k: v for k, v in s.model.state_dict().items() if "running" not in k and "num_batches" not in k})
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])


def test_a_seed_fixes_everything_the_two_arms_share(cache_dir, tmp_path):
    """The two arms of a seed (alpha 0 and distilled) start from the same weights and draw the same batch
    order and dropout masks: their difference is the teacher's term alone (stats.paired, a plan study's comparisons)."""
    arms = []
    for alpha in (0.0, 0.5):
        s = train_student.setup(tiny_train_config(cache=cache_dir, alpha=alpha, seed=3, out=tmp_path / str(alpha)))
        start = {k: v.clone() for k, v in s.model.state_dict().items()}
        train_student.fit(s)
        arms.append((start, s.generator.get_state(), torch.get_rng_state(), s.model.state_dict()))
    (start0, order0, dropout0, end0), (start1, order1, dropout1, end1) = arms
    assert all(torch.equal(start0[k], start1[k]) for k in start0)
    assert torch.equal(order0, order1) and torch.equal(dropout0, dropout1)  # the same draws during training
    assert not all(torch.equal(end0[k], end1[k]) for k in end0)  # while the loss did differ



@pytest.mark.parametrize("n, size, world, expected", [
    (10, 5, 1, [5, 5]), (11, 5, 1, [5, 6]), (1, 5, 1, [1]), (12, 5, 2, [5, 7]), (13, 5, 2, [5, 8]), (14, 5, 2, [5, 5, 4]),
])
def test_a_last_batch_too_small_for_batchnorm_joins_the_one_before(n, size, world, expected):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    batches = train_student.epoch_batches(order, size, world)
    assert [len(b) for b in batches] == expected
    assert torch.equal(torch.cat(batches), order)  # every example once, in the epoch's order


def test_a_train_split_of_k_batches_plus_one_trains_and_one_per_batch_is_refused(cache_dir, tmp_path):
    """36 train images in batches of 5 left a last batch of one, which BatchNorm cannot normalise at 32 px
    (1 x 1 feature maps): a ValueError traceback on the last step, in training and in precise BN."""
    report = train_student.run(tiny_train_config(cache=cache_dir, out=tmp_path / "b5", batch_size=5, epochs=1,
                                                 precise_bn=True))
    assert len(report.history) == 1 and np.isfinite(report.history[0]["train"]["loss"])
    with pytest.raises(KdpipeError, match="--batch-size 1: BatchNorm in training mode cannot normalise a single"):
        train_student.run(tiny_train_config(cache=cache_dir, out=tmp_path / "b1", batch_size=1, epochs=1))


def test_run_json_names_the_checkpoint_weights_a_student_config_drew_afresh(cache_dir, teacher_dir, tmp_path, run_cli):
    """--student CHECKPOINT with another image_size re-initialises the ViT's position embeddings (their shape
    follows the resolution); transformers said so in a log line the CLI silences. run.json records it, the CLI
    prints it."""
    same = train_student.run(tiny_train_config(cache=cache_dir, out=tmp_path / "same", student=str(teacher_dir),
                                               student_config={}, epochs=1))
    assert same.run["student_init"] == {"from": str(teacher_dir), "reinitialised": []}
    code, text = run_cli("train-student", "--cache", cache_dir, "--student", teacher_dir, "--student-config",
                         "image_size=64", "--epochs", "1", "--precision", "fp32", "--device", "cpu", "--out",
                         tmp_path / "resized")
    assert code == 0, text
    run = json.loads((tmp_path / "resized" / "run.json").read_text())
    assert run["student_init"]["reinitialised"] == ["vit.embeddings.position_embeddings"]
    assert "1 weight tensor(s)" in text and "vit.embeddings.position_embeddings" in text.replace("\n", ""), text
    scratch = train_student.run(tiny_train_config(cache=cache_dir, out=tmp_path / "scratch", epochs=1))
    assert scratch.run["student_init"] == {"from": "random"}


def test_resume_on_a_cache_rebuilt_in_place_is_refused(image_folder, teacher_dir, tmp_path):
    """The same flags, but `cache-teacher --force` with another teacher rebuilt the cache at the same path: the
    remaining epochs would have trained on other targets than the first (the flags alone cannot tell)."""
    from tests.helpers import make_teacher
    from kdpipe import cache_teacher
    from kdpipe.config import CacheConfig

    cache = tmp_path / "cache"
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=cache, precision="fp32",
                                  workers=0))

    with pytest.raises(Stop):
        train_student.run(tiny_train_config(cache=cache, epochs=2, out=tmp_path / "run"), on_epoch=_stop_after(1))
    other = make_teacher(tmp_path / "other-teacher", seed=1)
    cache_teacher.run(CacheConfig(teacher=str(other), dataset=str(image_folder), out=cache, precision="fp32",
                                  workers=0, force=True))
    with pytest.raises(KdpipeError, match=r"--resume: .* was started on other inputs \(cache split 'test', cache split "
                                          r"'train', cache split 'validation' changed since\)"):
        train_student.run(tiny_train_config(cache=cache, epochs=2, out=tmp_path / "run", resume=True))


def test_evaluate_on_another_dataset_of_the_same_labels_skips_the_teacher_metrics(cache_dir, tmp_path):
    """A student evaluated on new images of its classes: the cache holds no teacher logits for them, which used to
    refuse the evaluation (`cache and dataset hold different examples`) though only the teacher metrics need them."""
    from tests.helpers import make_image_folder

    train_student.run(tiny_train_config(cache=cache_dir, out=tmp_path / "run", epochs=1))
    own = evaluate.saved(tmp_path / "run", "test")
    assert "teacher_agreement" in own and "teacher_note" not in own
    other = make_image_folder(tmp_path / "new-images", per_class={"test": 3}, seed=7)
    new = evaluate.saved(tmp_path / "run", "test", dataset=str(other))
    assert new["n"] == 9 and "teacher_agreement" not in new
    assert "teacher agreement not measured: the run's cache has other example ids" in new["teacher_note"]


def test_a_run_interrupted_before_recipes_existed_resumes_on_its_own_settings(cache_dir, tmp_path):
    """Issue 57, point 2: the default recipe changed; a checkpoint written before recipes (no recipe recorded,
    the guide's optimisation then being the default) resumes with those settings, not today's defaults."""
    from kdpipe import run_folder

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    settings = dict(cache=cache_dir, epochs=2, out=tmp_path / "old", student_config={"image_size": 32,
                    "depth_multiplier": 0.35}, precision="fp32", device="cpu")  # no optimisation flag: the defaults
    with pytest.raises(Stop):
        train_student.run(TrainConfig(**settings, recipe="before-recipes"), on_epoch=stop)
    path = tmp_path / "old" / run_folder.CHECKPOINT
    state = run_folder.read_checkpoint(path)
    state["config"] = {k: v for k, v in state["config"].items() if k not in ("recipe", "from_recipe")}
    run_folder.write_checkpoint(tmp_path / "old", state, run_folder.read_history(tmp_path / "old"))
    report = train_student.run(TrainConfig(**settings, resume=True))
    config = report.run["config"]
    assert [r["epoch"] for r in report.history] == [1, 2]
    assert (config["recipe"], config["lr"], config["batch_size"], config["schedule"]) == ("before-recipes", 5e-5, 8,
                                                                                            "linear")
    assert "classifier_dropout_prob" not in config["student_config"]


RESOLUTION_FLAGS = ["--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--device", "cpu", "--test-split", ""]


def test_the_student_resolution_is_the_teachers_never_above_the_images_and_printed(run_cli, cache_dir, tmp_path):
    """Issue 57, point 1: on small images the student trained at MobileNetV2's 224 px whatever the data."""
    code, out = run_cli("train-student", "--cache", cache_dir, "--out", tmp_path / "kd", *RESOLUTION_FLAGS,
                        "--student-config", "depth_multiplier=0.35")  # 40-px images, a teacher at 32 px
    assert code == 0, out
    run = json.loads((tmp_path / "kd" / "run.json").read_text())
    assert run["student"]["inputs"]["size"] == [32, 32] and run["student_resolution"]["size"] == [32, 32]
    assert "student resolution 32 x 32 px: the teacher's input size" in " ".join(out.split()), out
    small = tmp_path / "small"
    from tests.helpers import make_image_folder

    make_image_folder(small, {"train": 4, "validation": 2}, size=24)
    code, out = run_cli("train-student", "--dataset", small, "--alpha", "0", "--out", tmp_path / "scratch",
                        *RESOLUTION_FLAGS, "--student-config", "depth_multiplier=0.35")
    assert code == 0, out
    assert json.loads((tmp_path / "scratch" / "run.json").read_text())["student"]["inputs"]["size"] == [24, 24]
    assert "student resolution 24 x 24 px: the images' own size" in " ".join(out.split()), out
    code, out = run_cli("train-student", "--dataset", small, "--alpha", "0", "--out", tmp_path / "flag",
                        *RESOLUTION_FLAGS, "--student-config", "depth_multiplier=0.35,image_size=40")
    assert code == 0, out
    assert json.loads((tmp_path / "flag" / "run.json").read_text())["student"]["inputs"]["size"] == [40, 40]
    assert "student resolution 40 x 40 px: --student-config image_size" in " ".join(out.split()), out


def test_the_from_scratch_twin_is_named_plainly(run_cli, cache_dir, image_folder, tmp_path):
    """Issue 57, point 4: --dataset --alpha 0 normalises with 0.5/0.5, --cache --alpha 0 with the teacher's:
    only the second is the distilled run's twin, and the run, the card and --help say which."""
    from kdpipe import model_card

    code, out = run_cli("train-student", "--dataset", image_folder, "--alpha", "0", "--out", tmp_path / "alone",
                        *RESOLUTION_FLAGS, "--student-config", TINY_STUDENT)
    assert code == 0 and "no --cache: inputs normalised with mean and std 0.5" in " ".join(out.split()), out
    alone = json.loads((tmp_path / "alone" / "run.json").read_text())
    assert "without a teacher's cache" in model_card.render(alone, "alone") and "twin" not in model_card.render(
        alone, "alone").split("## Teacher")[0]
    code, out = run_cli("train-student", "--cache", cache_dir, "--alpha", "0", "--out", tmp_path / "twin",
                        *RESOLUTION_FLAGS, "--student-config", TINY_STUDENT)
    assert code == 0 and "no --cache" not in out, out
    twin = json.loads((tmp_path / "twin" / "run.json").read_text())
    assert "the from-scratch twin" in model_card.render(twin, "twin")
    assert twin["student"]["inputs"]["mean"] == [0.5, 0.4, 0.3] and alone["student"]["inputs"]["mean"] == [0.5] * 3
    from typer.testing import CliRunner

    from kdpipe import cli

    help_text = " ".join(CliRunner().invoke(cli.app, ["train-student", "--help"], env={"COLUMNS": "400"}).output.split())
    assert "twin is --alpha 0 with the same --cache" in help_text


def test_evaluate_names_an_interrupted_run_and_how_the_cache_differs(run_cli, cache_dir, image_folder, tmp_path):
    """Issue 57, point 5: `evaluate` on a folder train-student left mid-run said "no run.json; pass a folder
    written by kdpipe train-student"; on the same images under other ids or bytes, "other images"."""
    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    with pytest.raises(Stop):
        train_student.run(tiny_train_config(cache=cache_dir, out=tmp_path / "cut", epochs=2), on_epoch=stop)
    code, out = run_cli("evaluate", tmp_path / "cut")
    flat = " ".join(out.split())
    assert code == 1 and "interrupted after epoch 1" in flat and f"--out {tmp_path / 'cut'} --resume" in flat, out
    train_student.run(tiny_train_config(cache=cache_dir, out=tmp_path / "run", epochs=1))
    renamed = shutil.copytree(image_folder, tmp_path / "renamed")  # the same pixels under other ids
    for path in sorted((renamed / "test").rglob("*.png")):
        path.rename(path.with_name("x-" + path.name))
    note = evaluate.saved(tmp_path / "run", "test", dataset=str(renamed))["teacher_note"]
    assert "other example ids" in note and "12 of this dataset's 12 ids are not in it" in note, note
    reencoded = shutil.copytree(image_folder, tmp_path / "reencoded")  # the same ids, other bytes
    for path in sorted((reencoded / "test").rglob("*.png")):
        Image.open(path).save(path, compress_level=0)
    note = evaluate.saved(tmp_path / "run", "test", dataset=str(reencoded))["teacher_note"]
    assert "the same ids" in note and "other image bytes" in note, note
