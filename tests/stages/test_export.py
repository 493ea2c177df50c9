"""kdpipe export: a tiny student whose logits have scale (its trained weights redrawn He-normal, BatchNorm
statistics recomputed: a freshly trained tiny MobileNetV2 answers ~1e-2 for every image, which no bound would
test) exported to ONNX and int8, checked against the PyTorch student, timed beside the teacher; the bounds
refuse, and bad inputs are one line."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import CLASSES, REPO, make_image_folder, tiny_train_config

needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")),
                                reason='the export extra is not installed (pip install -e ".[export]")')


def _with_scale(run: Path, seed: int = 0) -> None:
    """Redraw every conv and linear weight of the saved student He-normal and its BatchNorm statistics on noise
    (so activations stay O(1), as in a trained network), and record the new weights' checksum in run.json, as
    if it had been trained to them."""
    from transformers import AutoModelForImageClassification

    from kdpipe import files

    model = AutoModelForImageClassification.from_pretrained(run / "model")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2 / module.weight[0].numel()) ** 0.5)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # a cumulative average over the batches below
        model.train()
        for _ in range(4):
            model(pixel_values=torch.randn(32, 3, 32, 32, generator=g))
    model.eval().save_pretrained(run / "model", safe_serialization=True)
    record = json.loads((run / "run.json").read_text())
    record["student"]["weights_sha256"] = files.sha256(run / "model" / "model.safetensors")
    (run / "run.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    from kdpipe import train_student

    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # data/pixels of this module here
        train_student.run(tiny_train_config(cache=cache_dir, out=root / "run", epochs=1))
    _with_scale(root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained) -> Path:
    """The run exported through the CLI: fp32 and int8 (its drop bound opened: 12 test images, one is 8 pp),
    timed briefly."""
    from typer.testing import CliRunner

    from kdpipe import cli

    run = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(trained, run)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run.parent)
        result = CliRunner().invoke(cli.app, ["export", str(run), "--int8", "--int8-max-drop", "1", "--latency-runs", "2",
                                              "--throughput-batches", "1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    (run / "cli-output.txt").write_text(result.output)
    return run


def _student(run: Path):
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(run / "model").eval()


@needs_onnx
def test_the_onnx_model_loads_in_onnx_runtime_with_any_batch_and_says_what_the_student_says(exported):
    import onnx
    import onnxruntime as ort

    path = exported / "onnx" / "model.onnx"
    model = _student(exported)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # dynamic batch: neither is the size it was traced with (2)
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model(pixel_values=x).logits.numpy()
        got = sess.run(["logits"], {"pixel_values": x.numpy()})[0]
        assert got.shape == (batch, len(CLASSES))
        assert np.abs(got - want).max() <= 1e-3 * max(1.0, np.abs(want).max())
        assert np.abs(want).max() > 0.1  # the logits have scale: the bound tests something
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    record = json.loads((exported / "run.json").read_text())
    assert meta["kdpipe.student_weights_sha256"] == record["student"]["weights_sha256"]
    assert meta["kdpipe.exporter"] == "dynamo" and json.loads(meta["kdpipe.labels"]) == CLASSES
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {20}
    for name in ("preprocessor_config.json", "config.json"):
        assert (exported / "onnx" / name).read_text() == (exported / "model" / name).read_text()


@needs_onnx
def test_fidelity_on_the_runs_own_splits_is_recorded_within_its_bounds(exported):
    record = json.loads((exported / "run.json").read_text())["export"]
    assert record["exporter"] == "dynamo" and record["opset"] == 20 and "onnxruntime" in record["versions"]
    assert record["bounds"] == {"max_logit_diff": 1e-3, "min_agreement": 1.0, "int8_max_drop": 1.0}
    fp32, int8 = record["fidelity"]["fp32"], record["fidelity"]["int8"]
    assert set(fp32) == set(int8) == {"validation", "test"}
    for split, m in fp32.items():
        assert m["max_abs_logit_diff"] <= 1e-3 and m["agreement"] == 1.0 and m["n"] == 12
        assert m["max_abs_logit"] > 0.1, "a student without logit scale tests no bound"
        assert m["accuracy"] == m["accuracy_pytorch"]
        assert int8[split]["accuracy_drop"] == pytest.approx(m["accuracy_pytorch"] - int8[split]["accuracy"])
        assert 0 < int8[split]["max_abs_logit_diff"]  # int8 rounds: not the same numbers, yet close enough
    assert record["int8"]["method"] == "static" and record["int8"]["format"] == "QDQ"
    assert record["int8"]["calibration_images"] == 3 * 12  # every train image of the tiny folder (< 128)


@needs_onnx
def test_speed_and_size_side_by_side_in_run_json_the_model_card_and_the_output(exported):
    from kdpipe import export

    record = json.loads((exported / "run.json").read_text())["export"]
    rows = {(r["model"], r["runtime"]): r for r in record["speed"]["rows"]}
    assert {("teacher", "pytorch fp32"), ("teacher", "onnx fp32"), ("student", "pytorch fp32"), ("student", "onnx fp32"),
            ("student", "onnx int8")} <= set(rows)
    for r in rows.values():
        assert r["latency_ms_median"] > 0 and r["latency_ms_p90"] >= r["latency_ms_median"] and r["throughput_per_s"] > 0
        assert r["parameters"] > 0 and r["file_bytes"] > 0
    assert rows[("student", "onnx fp32")]["file_bytes"] == (exported / "onnx" / "model.onnx").stat().st_size
    assert rows[("student", "onnx int8")]["file_bytes"] < rows[("student", "onnx fp32")]["file_bytes"]
    assert not list((exported / "onnx").glob(".teacher*"))  # the teacher's export was measured, not kept
    s = record["summary"]
    assert s["deployed"] == "onnx int8"
    assert s["smaller"] == pytest.approx(rows[("teacher", "onnx fp32")]["file_bytes"] / rows[("student", "onnx int8")]["file_bytes"])
    card = (exported / "model" / "README.md").read_text()
    assert "## Deployment (ONNX)" in card and f"{s['speedup']:.1f}× faster and {s['smaller']:.1f}× smaller" in card
    assert "| student | onnx int8 |" in card and "| teacher | onnx fp32 |" in card
    out = (exported / "cli-output.txt").read_text()
    assert export.headline(s) in " ".join(out.split())


def _fake_session(logits: np.ndarray):
    class Session:
        def run(self, names, feeds):
            start = Session.at
            Session.at += len(feeds["pixel_values"])
            return [logits[start:Session.at]]

    Session.at = 0
    return Session()


def _split(n: int = 12, labels=None):
    from kdpipe.student_data import SplitData

    labels = np.arange(n) % 3 if labels is None else labels
    return SplitData("test", [str(i) for i in range(n)], torch.zeros(n, 4, 4, 3, dtype=torch.uint8),
                     torch.from_numpy(labels), None)


def _inputs():
    return {"mean_t": torch.zeros(3), "std_t": torch.ones(3)}


def test_the_fp32_bound_refuses_a_model_that_differs_by_more_than_it():
    from kdpipe import export
    from kdpipe.config import ExportConfig
    from kdpipe.errors import KdpipeError

    data = {"test": _split()}
    reference = np.eye(3, dtype=np.float32)[np.arange(12) % 3] * 4  # (12, 3), right on every image
    close = reference + 5e-4
    m = export.check_fp32(_fake_session(close), data, {"test": reference}, _inputs(), ExportConfig())
    assert m["test"]["max_abs_logit_diff"] == pytest.approx(5e-4, rel=1e-3) and m["test"]["agreement"] == 1.0
    with pytest.raises(KdpipeError, match=r"max \|Δlogit\| 2\.00e-03 at logits up to 4 \(bound --max-logit-diff 0\.001\)"):
        export.check_fp32(_fake_session(reference + 2e-3), data, {"test": reference}, _inputs(), ExportConfig())
    flipped = reference.copy()
    flipped[0] = flipped[0][::-1]  # one answer changed
    with pytest.raises(KdpipeError, match=r"argmax agreement 91\.67%"):
        export.check_fp32(_fake_session(flipped), data, {"test": reference}, _inputs(), ExportConfig(max_logit_diff=10))


def test_the_int8_bound_refuses_an_accuracy_drop_beyond_it():
    from kdpipe import export
    from kdpipe.config import ExportConfig
    from kdpipe.errors import KdpipeError

    data = {"test": _split()}
    reference = np.eye(3, dtype=np.float32)[np.arange(12) % 3] * 4  # 100 % accurate
    int8 = reference + 0.05
    m = export.check_int8(_fake_session(int8), data, {"test": reference}, _inputs(), ExportConfig(int8=True))
    assert m["test"]["accuracy_drop"] == 0 and m["test"]["agreement_with_fp32"] == 1.0
    worse = reference.copy()
    worse[:2] = np.roll(worse[:2], 1, axis=1)  # two of 12 wrong: 16.7 pp
    with pytest.raises(KdpipeError, match=r"loses 16\.7 pp of accuracy on test \(bound --int8-max-drop 0\.01"):
        export.check_int8(_fake_session(worse), data, {"test": reference}, _inputs(), ExportConfig(int8=True))
    assert export.check_int8(_fake_session(worse), data, {"test": reference}, _inputs(),
                             ExportConfig(int8=True, int8_max_drop=0.2))["test"]["accuracy_drop"] == pytest.approx(2 / 12)


@needs_onnx
def test_a_missed_bound_is_refused_loudly_and_writes_nothing(run_cli, exported, tmp_path, monkeypatch):
    from kdpipe import export

    run = tmp_path / "run"
    shutil.copytree(exported, run, ignore=shutil.ignore_patterns("onnx"))
    before = (run / "run.json").read_text(), (run / "model" / "README.md").read_text()
    onnx_file = exported / "onnx" / "model.onnx"
    monkeypatch.setattr(export, "to_onnx", lambda model, path, *a, **k: shutil.copy(onnx_file, path))
    real = export.run_onnx
    monkeypatch.setattr(export, "run_onnx", lambda *a: real(*a) + 0.01)  # an export that drifted
    code, out = run_cli("export", run, "--no-speed")
    assert code == 1 and "error: the fp32 ONNX model differs from the PyTorch student on validation" in out
    assert "nothing was written" in out and "Traceback" not in out
    assert not (run / "onnx").exists() and not list(run.glob(".onnx*"))
    assert ((run / "run.json").read_text(), (run / "model" / "README.md").read_text()) == before


@needs_onnx
def test_a_student_that_does_not_export_names_the_operator(run_cli, trained, tmp_path, monkeypatch):
    from kdpipe import export

    class Cumulative(torch.nn.Module):  # an operator no ONNX exporter translates
        def forward(self, x):
            return torch.cummax(x, 1).values

    load = export.load_saved

    def broken(run_dir):
        r, model, proc = load(run_dir)
        model.classifier = torch.nn.Sequential(model.classifier, Cumulative())
        return r, model, proc

    monkeypatch.setattr(export, "load_saved", broken)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, out = run_cli("export", run, "--no-speed")
    assert code == 1 and "does not export with --exporter dynamo --opset 20 (operator cummax is not supported)" in out
    assert "try --exporter torchscript" in out and "Traceback" not in out and not (run / "onnx").exists()


@needs_onnx
@pytest.mark.parametrize("args, message", [
    (["--exporter", "optimum"], "--exporter 'optimum' is not supported; use dynamo or torchscript"),
    (["--opset", "17"], "--opset 17 is not supported by --exporter dynamo; use 18-23"),
    (["--exporter", "torchscript", "--opset", "21"], "--opset 21 is not supported by --exporter torchscript; use 7-20"),
    (["--calibration-images", "0"], "--calibration-images must be > 0"),
])
def test_unsupported_exporter_or_opset_is_one_line(run_cli, trained, args, message):
    code, out = run_cli("export", trained, *args)
    assert code == 1 and message in out and len(out.strip().splitlines()) == 1, out


@needs_onnx
def test_a_run_without_weights_or_not_a_run_is_one_line(run_cli, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "model" / "model.safetensors").unlink()
    code, out = run_cli("export", run)
    assert code == 1 and "model.safetensors is missing: the saved student is incomplete" in out
    assert len(out.strip().splitlines()) == 1, out
    code, out = run_cli("export", tmp_path / "nowhere")
    assert code == 1 and "no run.json; pass a folder written by kdpipe train-student" in out
    assert not (tmp_path / "nowhere").exists()


@needs_onnx
def test_calibration_data_missing_is_one_line(run_cli, trained, tmp_path):
    folder = make_image_folder(tmp_path / "no-train", {"validation": 4, "test": 4})  # the run's images, less train
    code, out = run_cli("export", trained, "--int8", "--dataset", folder, "--no-speed")
    assert code == 1 and "--int8: calibration data missing" in out and "export without --int8" in out, out
    assert len(out.strip().splitlines()) == 1, out


def test_without_the_export_extra_the_command_says_how_to_install_it(run_cli, trained, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code, out = run_cli("export", trained)
    assert code == 1 and 'needs onnxruntime, not installed: pip install -e ".[export]"' in out


def test_int8_calibrates_on_the_stored_views_where_the_run_trained_on_them(image_folder, teacher_dir, tmp_path):
    from kdpipe import cache_teacher, data, export
    from kdpipe.config import CacheConfig
    from kdpipe.errors import KdpipeError
    from kdpipe.student_data import with_tensors

    cache = tmp_path / "views"
    cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(image_folder), out=cache, precision="fp32",
                                  workers=0, views=2))
    split = data.open_dataset(str(image_folder), splits=["train"]).splits["train"]
    inputs = with_tensors({"size": (32, 32), "resample": 2, "mean": [0.5] * 3, "std": [0.5] * 3}, torch.device("cpu"))
    on_views = {"config": {"views": True, "cache": str(cache)}, "seed": 0}
    viewed = export.train_split(on_views, split, inputs, None)
    assert viewed.per_image == 3  # the image itself and its 2 views
    plain = export.train_split({"config": {"views": False}, "seed": 0}, split, inputs, None)
    a = np.concatenate(export.calibration_batches(viewed, inputs, 20, on_views))
    b = np.concatenate(export.calibration_batches(plain, inputs, 20, on_views))
    assert a.shape == b.shape == (20, 3, 32, 32)  # 20 of the 36 train images, the same ones (the run's seed)
    same = [np.array_equal(x, y) for x, y in zip(a, b)]
    assert not all(same) and any(same)  # a random one of each image's 3 rows: mostly a view, sometimes the image
    shutil.rmtree(cache)
    with pytest.raises(KdpipeError, match=r"--int8: calibration data missing: the run trained on the stored views"):
        export.train_split(on_views, split, inputs, None)


@needs_onnx
def test_bench_export_measures_an_existing_run_as_it_is(trained, tmp_path, monkeypatch):
    """benchmarks/bench_export.py --run RUN: that run is exported, checked and timed (int8 tried; where its bound
    refuses, the fp32 export alone, the refusal recorded); nothing is cached or trained."""
    spec = importlib.util.spec_from_file_location("bench_export", REPO / "benchmarks" / "bench_export.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run, work = tmp_path / "run", tmp_path / "work"
    shutil.copytree(trained, run)
    monkeypatch.chdir(tmp_path)
    out = bench.main(["--run", str(run), "--work", str(work), "--latency-runs", "2", "--throughput-batches", "1",
                      "--json", str(tmp_path / "r.json")])
    assert out["run"] == str(run) and not work.exists()  # measured as it is: no cache, no training
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(out))
    assert json.loads((run / "run.json").read_text())["export"] == json.loads(json.dumps(out["export"]))
    assert out["int8_refused"] is None or "the int8 model loses" in out["int8_refused"]
    assert ("int8" in out["export"]["fidelity"]) == (out["int8_refused"] is None)
    assert {(r["model"], r["runtime"]) for r in out["export"]["speed"]["rows"]} >= {
        ("teacher", "pytorch fp32"), ("teacher", "onnx fp32"), ("student", "pytorch fp32"), ("student", "onnx fp32")}
    assert out["command"].startswith("python benchmarks/bench_export.py --run ")


@needs_onnx
def test_bench_int8_chooses_on_validation_and_measures_test_for_the_chosen_one_only(trained, tmp_path, monkeypatch):
    """benchmarks/bench_int8.py: every quantiser configuration measured on validation; the chosen one is, of those
    within the bound, the closest to the PyTorch student there (agreement, then mean |Δlogit|); test only for it."""
    spec = importlib.util.spec_from_file_location("bench_int8", REPO / "benchmarks" / "bench_int8.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "CONFIGS", {k: bench.CONFIGS[k] for k in ("default (kdpipe export --int8)",
                                                                        "per-tensor weights", "Percentile 99.999",
                                                                        "first conv and classifier in fp32")})
    out = bench.main(["--run", str(trained), "--max-drop", "1", "--json", str(tmp_path / "r.json")])
    rows = out["configs"]
    assert set(rows) == set(bench.CONFIGS) and all("validation" in r for r in rows.values())
    best = max(rows.values(), key=lambda r: (r["validation"]["agreement"], -r["validation"]["mean_abs_logit_diff"]))
    assert rows[out["chosen"]] == best
    assert [n for n, r in rows.items() if "test" in r] == [out["chosen"]]  # test measured once, for the chosen
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(out))
