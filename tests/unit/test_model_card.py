"""The model card (`model/README.md`): Hub metadata that parses (PyYAML, and huggingface_hub's ModelCard when
installed), the measured accuracies in its model-index, and a reproduce command that really reproduces."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from tests.helpers import TINY_STUDENT, tiny_train_config
from kdpipe import model_card, train_student
from kdpipe.config import TrainConfig


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, sep, _ = text[4:].partition("\n---\n")
    assert sep, "no closing --- after the metadata"
    return yaml.safe_load(head)


def hub_run(**config) -> dict:
    return {"config": TrainConfig(cache="data/cache/vit/beans", loss="dkd", temperature=4.0, **{"epochs": 30, **config}).to_dict(),
            "precision": "bf16", "seed": 3, "best_epoch": 7,
            "dataset": {"spec": "beans", "kind": "hub", "revision": "abc", "label_names": ["a", "b", "c"]},
            "dataset_fingerprints": {"train": "1" * 64, "validation": "2" * 64, "test": "3" * 64},
            "cache": {"teacher": {"spec": "merve/beans-vit-224", "revision": "f00d", "weights_sha256": None,
                                  "architecture": "ViTForImageClassification"},
                      "precision": "fp32", "splits": {"test": {"teacher_accuracy": 0.977}}},
            "cache_matches_dataset_contents": True,
            "validation": {"accuracy": 0.9624060150375939, "macro_f1": 0.9621, "n": 133, "teacher_agreement": 0.97},
            "test": {"accuracy": 0.921875, "macro_f1": 0.9201, "n": 128},
            "label_names": ["angular_leaf_spot", "bean_rust", "healthy"],
            "student": {"architecture": "MobileNetV2ForImageClassification", "parameters": 2_227_715}}


def test_the_metadata_follows_the_hub_schema():
    text = model_card.render(hub_run(), "dkd-seed3")
    meta = front_matter(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert "knowledge-distillation" in meta["tags"] and meta["datasets"] == ["beans"]
    assert meta["base_model"] == "merve/beans-vit-224"
    [entry] = meta["model-index"]
    assert entry["name"] == "dkd-seed3"
    found = {(r["dataset"]["split"], m["type"]): m["value"] for r in entry["results"] for m in r["metrics"]}
    assert found == {("test", "accuracy"): 0.9219, ("test", "f1"): 0.9201,
                     ("validation", "accuracy"): 0.9624, ("validation", "f1"): 0.9621}
    for r in entry["results"]:
        assert r["task"]["type"] == "image-classification"
        assert r["dataset"]["type"] == "beans" and r["dataset"]["revision"] == "abc"
    body = text.split("\n---\n", 1)[1]
    for needed in ("merve/beans-vit-224", "1" * 64, "decoupled KD", "| temperature T | 4 |", "| λ (alpha) | 0.5 |",
                   "| DKD β (non-target weight) | 8 |", "| epochs | 30 |", "| seed | 3 |", "| test | 92.19% |",
                   "| validation | 96.24% |", "kdpipe train-student --cache data/cache/vit/beans"):
        assert needed in body, needed


def test_huggingface_hub_reads_the_card():
    hub = pytest.importorskip("huggingface_hub")
    card = hub.ModelCard(model_card.render(hub_run(standardize=True), "run"))
    assert card.data.library_name == "transformers" and card.data.base_model == "merve/beans-vit-224"
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("test", "accuracy")] == 0.9219 and results[("validation", "accuracy")] == 0.9624
    assert "logit standardisation" in card.text


def test_local_teacher_and_dataset_are_named_in_the_text_not_as_hub_ids():
    run = hub_run()
    run["dataset"] = {"spec": "../shared/beans", "kind": "local", "root": "/work/shared/beans"}
    run["cache"]["teacher"] = {"spec": "../shared/teachers/beans-efficientnet-lite0", "revision": None,
                               "weights_sha256": "e" * 64, "architecture": "EfficientNetForImageClassification"}
    text = model_card.render(run, "r")
    meta = front_matter(text)
    assert "base_model" not in meta and "datasets" not in meta  # they must name Hub repositories
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "beans"
    assert "local folder `../shared/teachers/beans-efficientnet-lite0` (weights sha256 `" + "e" * 64 in text


def test_every_saved_student_gets_a_card_whose_command_reproduces_it(run_cli, cache_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    code, out = run_cli("train-student", "--cache", cache_dir, "--loss", "dist", "--dist-gamma", "0.5", "-T", "2",
                        "--alpha", "0.7", "--epochs", "1", "--lr", "3e-3", "--student-config", TINY_STUDENT,
                        "--precision", "fp32", "--device", "cpu", "--seed", "4", "--out", first)
    assert code == 0, out
    text = (first / "model" / "README.md").read_text()
    run = json.loads((first / "run.json").read_text())
    meta = front_matter(text)
    accuracy = {r["dataset"]["split"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
    assert accuracy == {split: round(run[split]["accuracy"], 4) for split in ("test", "validation")}
    assert "base_model" not in meta  # the test teacher is a local folder
    command = text.split("```bash\n", 1)[1].split("\n```", 1)[0]
    args = shlex.split(command)
    assert args[:2] == ["kdpipe", "train-student"] and "--device" not in args and "--out" not in args
    code, out = run_cli(*args[1:], "--out", second)
    assert code == 0, out
    again = json.loads((second / "run.json").read_text())
    assert {k: v for k, v in again["config"].items() if k not in ("out", "device")} == \
        {k: v for k, v in run["config"].items() if k not in ("out", "device")}
    assert again["student"]["weights_sha256"] == run["student"]["weights_sha256"]  # same seed, same CPU: same weights
    assert (second / "model" / "README.md").read_text() == text.replace(first.name, second.name)


def test_a_from_scratch_student_gets_a_card_without_a_teacher(image_folder, tmp_path):
    report = train_student.run(tiny_train_config(dataset=str(image_folder), alpha=0.0, epochs=1, out=tmp_path / "s"))
    text = (report.out / "model" / "README.md").read_text()
    meta = front_matter(text)
    assert "base_model" not in meta and meta["model-index"][0]["name"] == "s"
    assert "trained by kdpipe on the labels alone (λ = 0)" in text
    assert "None (λ = 0, trained without a cache)." in text
    assert "--alpha 0.0" in text and "--cache" not in text


def test_the_card_follows_a_local_datasets_own_name_and_classes():
    """Issue 57, point 5: a digits model's card read classify("leaf.jpg") and named its local folder
    `imagefolder`, as if it were the Hub's loader."""
    run = hub_run()
    run["dataset"] = {"spec": "data/digits/imagefolder", "kind": "local", "revision": None,
                      "root": "/home/me/data/digits/imagefolder", "label_names": [str(i) for i in range(10)]}
    run["label_names"] = [str(i) for i in range(10)]
    text = model_card.render(run, "digits-kd")
    meta = front_matter(text)
    assert {r["dataset"]["name"] for r in meta["model-index"][0]["results"]} == {"digits"}
    assert "imagefolder" not in yaml.safe_dump(meta) and "leaf" not in text
    assert 'classify("image.png")  # an image like those of digits: scores for 0, 1, 2, 3, 4, ...' in text
    run["dataset"] = {"spec": "/d/digits/train.parquet", "kind": "local", "root": "/d/digits", "label_names": []}
    assert front_matter(model_card.render(run, "p"))["model-index"][0]["results"][0]["dataset"]["name"] == "digits"
