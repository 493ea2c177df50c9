"""Stage one: `kdpipe cache-teacher` and `inspect-cache`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.helpers import CLASSES, SHARED, make_image_folder, make_teacher, read_cache_table
from kdpipe import cache_teacher, logit_store
from kdpipe.config import CacheConfig
from kdpipe.data import open_dataset
from kdpipe.errors import KdpipeError


def direct_logits(teacher_dir: Path, folder: Path, split: str) -> tuple[list[str], np.ndarray]:
    """Reference: the teacher's forward pass on its own processor's output, image by image (fp32)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(teacher_dir).eval()
    proc = AutoImageProcessor.from_pretrained(teacher_dir)
    ids, out = [], []
    for path in sorted((folder / split).rglob("*.*")):
        with torch.no_grad():
            x = proc(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            out.append(model(pixel_values=x).logits[0].numpy())
        ids.append(path.relative_to(folder).as_posix())
    return ids, np.stack(out)


def cached(cache: Path, split: str) -> dict[str, np.ndarray]:
    s = logit_store.read_split(logit_store.split_path(cache, split))
    return dict(zip(s.ids, s.logits))


def test_cached_logits_equal_a_direct_forward(cache_dir, teacher_dir, image_folder):
    for split in ("train", "test"):
        ids, ref = direct_logits(teacher_dir, image_folder, split)
        got = cached(cache_dir, split)
        assert sorted(got) == sorted(ids)
        np.testing.assert_allclose(np.stack([got[i] for i in ids]), ref, atol=2e-5, rtol=1e-5)


def test_metadata_is_complete_and_correct(cache_dir, teacher_dir, image_folder):
    split = logit_store.read_split(logit_store.split_path(cache_dir, "validation"))
    m = split.meta
    assert m["format_version"] == logit_store.FORMAT_VERSION and m["kdpipe_version"]
    assert m["teacher"]["spec"] == str(teacher_dir) and len(m["teacher"]["weights_sha256"]) == 64
    assert m["teacher"]["label_names"] == CLASSES and m["label_names"] == CLASSES
    assert m["processor"]["size"] == {"height": 32, "width": 32}
    assert m["dataset"]["spec"] == str(image_folder) and m["split"] == "validation"
    assert m["rows"] == 12 and m["num_classes"] == 3 and m["precision"] == "fp32"
    assert m["dataset_fingerprint"] == open_dataset(str(image_folder), splits=["validation"]).splits["validation"].fingerprint()
    assert m["teacher_accuracy"] == pytest.approx(float((split.logits.argmax(1) == split.labels).mean()))
    assert m["wall_time_s"] > 0 and m["images_per_s"] > 0 and {"torch", "transformers"} <= set(m["versions"])
    assert split.ids[0].startswith("validation/") and (split.view == 0).all()


def test_any_parquet_reader_opens_the_files(cache_dir):
    import datasets
    import pandas as pd

    df = pd.read_parquet(cache_dir / "train.parquet")
    assert list(df.columns) == ["id", "view", "label", "logits", "image_sha256"] and len(df) == 36
    ds = datasets.load_dataset("parquet", data_files=str(cache_dir / "test.parquet"), split="train")
    assert len(ds[0]["logits"]) == 3
    assert read_cache_table(cache_dir / "test.parquet").schema.field("logits").type.value_type == "float"


def test_rerun_is_a_noop_and_force_rebuilds(run_cli, image_folder, teacher_dir, tmp_path):
    args = ["cache-teacher", "--teacher", teacher_dir, "--dataset", image_folder, "--out", tmp_path / "c",
            "--precision", "fp32", "--workers", "0"]
    code, out = run_cli(*args)
    assert code == 0, out
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.parquet")}
    assert set(stamps) == {"train.parquet", "validation.parquet", "test.parquet"}
    code, out = run_cli(*args)
    assert code == 0 and "nothing to do" in out
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.parquet")}
    code, out = run_cli(*args, "--force")
    assert code == 0 and "written" in out
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in (tmp_path / "c").glob("*.parquet"))


def test_a_changed_input_invalidates_the_cache(image_folder, teacher_dir, tmp_path):
    folder = shutil.copytree(image_folder, tmp_path / "copy")
    cfg = CacheConfig(teacher=str(teacher_dir), dataset=str(folder), out=tmp_path / "c", precision="fp32",
                      workers=0, splits=["test"])
    assert not cache_teacher.run(cfg)[0].reused
    assert cache_teacher.run(cfg)[0].reused
    victim = next((folder / "test" / "healthy").iterdir())
    Image.new("RGB", (40, 40), (1, 2, 3)).save(victim)
    assert not cache_teacher.run(cfg)[0].reused  # same ids, other pixels: rebuilt


def test_teacher_labels_in_another_order_are_mapped_by_name(image_folder, tmp_path):
    permuted = [CLASSES[2], CLASSES[0], CLASSES[1]]
    teacher = make_teacher(tmp_path / "t", permuted)
    cache_teacher.run(CacheConfig(teacher=str(teacher), dataset=str(image_folder), out=tmp_path / "c",
                                  precision="fp32", workers=0, splits=["test"]))
    ids, ref = direct_logits(teacher, image_folder, "test")  # columns in the teacher's order
    got = cached(tmp_path / "c", "test")
    expected = ref[:, [permuted.index(c) for c in CLASSES]]  # columns in the dataset's order
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), expected, atol=2e-5)
    assert logit_store.read_meta(tmp_path / "c" / "test.parquet")["teacher"]["label_map"] == [1, 2, 0]


@pytest.mark.parametrize("names", [["cat", "dog", "bird"], CLASSES[:2]])
def test_a_label_mismatch_is_refused_naming_both_lists(run_cli, image_folder, tmp_path, names):
    teacher = make_teacher(tmp_path / "t", names)
    code, out = run_cli("cache-teacher", "--teacher", teacher, "--dataset", image_folder, "--out", tmp_path / "c")
    assert code == 1
    assert "Traceback" not in out and str(names) in out and str(CLASSES) in out
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.parquet"))


def test_a_teacher_with_generic_labels_is_matched_by_index_only_when_asked(run_cli, image_folder, tmp_path):
    """Issue 57, point 3: LABEL_0 ... LABEL_2 (saved without id2label) got advice that did not fit."""
    generic = make_teacher(tmp_path / "g", ["LABEL_0", "LABEL_1", "LABEL_2"])
    base = ["cache-teacher", "--teacher", generic, "--dataset", image_folder, "--splits", "test",
            "--precision", "fp32", "--workers", "0"]
    code, out = run_cli(*base, "--out", tmp_path / "refused")
    assert code == 1 and "generic" in out and "--labels-by-index" in out and "Traceback" not in out, out
    assert not list((tmp_path / "refused").glob("*.parquet"))
    code, out = run_cli(*base, "--out", tmp_path / "c", "--labels-by-index")
    assert code == 0, out
    meta = logit_store.read_meta(tmp_path / "c" / "test.parquet")
    assert meta["teacher"]["label_map"] == [0, 1, 2] and meta["teacher"]["labels_matched"].startswith("by index")
    ids, ref = direct_logits(generic, image_folder, "test")  # output i is class i
    got = cached(tmp_path / "c", "test")
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), ref, atol=2e-5)
    for names in (CLASSES, ["LABEL_0", "LABEL_1"]):  # named labels, or a count that differs: never by index
        teacher = make_teacher(tmp_path / f"t{len(names)}", names)
        code, out = run_cli(*base[:2], teacher, *base[3:], "--out", tmp_path / f"o{len(names)}", "--labels-by-index")
        assert code == 1 and "--labels-by-index matches a teacher with generic labels" in out, out


def test_odd_image_modes_are_converted_to_rgb(teacher_dir, tmp_path):
    folder = tmp_path / "modes"
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    variants = {
        "l.png": rgb.convert("L"), "rgba.png": rgb.convert("RGBA"), "p.png": rgb.convert("P"),
        "cmyk.jpg": rgb.convert("CMYK"), "la.png": rgb.convert("LA"),
        "i16.png": Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)),
    }
    for i, cls in enumerate(CLASSES):
        (folder / "train" / cls).mkdir(parents=True)
        for name, img in variants.items():
            img.save(folder / "train" / cls / f"{i}_{name}")
    reports = cache_teacher.run(CacheConfig(teacher=str(teacher_dir), dataset=str(folder), out=tmp_path / "c",
                                            precision="fp32", workers=0))
    assert reports[0].rows == 3 * len(variants)
    assert np.isfinite(logit_store.read_split(tmp_path / "c" / "train.parquet").logits).all()


def test_rgb_conversion_rules():
    from kdpipe.data import to_rgb

    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)  # composited on white
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped to garbage
    assert to_rgb(Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16))).getpixel((0, 0)) == (100, 100, 100)


def test_a_truncated_image_is_reported_by_name(run_cli, teacher_dir, tmp_path):
    folder = make_image_folder(tmp_path / "d", {"train": 3})
    victim = folder / "train" / "bean_rust" / "bean_rust_1.png"
    victim.write_bytes(victim.read_bytes()[:60])
    code, out = run_cli("cache-teacher", "--teacher", teacher_dir, "--dataset", folder, "--out", tmp_path / "c",
                        "--workers", "1")
    assert code == 1 and "train/bean_rust/bean_rust_1.png" in out and "Traceback" not in out
    assert not list((tmp_path / "c").glob("*.parquet")) if (tmp_path / "c").exists() else True


def test_a_missing_hub_gives_a_one_line_offline_hint(run_cli, image_folder, tmp_path):
    code, out = run_cli("cache-teacher", "--teacher", "nobody/no-such-teacher", "--dataset", image_folder,
                        "--out", tmp_path / "c")
    assert code == 1 and "--teacher" in out and "local" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) <= 3  # one message (rich may wrap it)
    code, out = run_cli("cache-teacher", "--dataset", "nobody/no-such-dataset", "--out", tmp_path / "c")
    assert code == 1 and "--dataset" in out and "local" in out and "Traceback" not in out


def test_inspect_cache_verifies_and_detects_corruption(run_cli, cache_dir, tmp_path):
    code, out = run_cli("inspect-cache", cache_dir)
    assert code == 0 and "checksum ok" in out and "validation" in out
    broken = shutil.copytree(cache_dir, tmp_path / "broken")
    path = broken / "train.parquet"
    table = read_cache_table(path)
    logits = table.column("logits").combine_chunks()
    flipped = logits.values.to_numpy().copy()
    flipped[5] += 1.0  # a silently wrong logit, metadata untouched
    import pyarrow as pa

    table = table.set_column(3, "logits", pa.FixedSizeListArray.from_arrays(pa.array(flipped), 3))
    pq.write_table(table, path)
    code, out = run_cli("inspect-cache", broken)
    assert code == 1 and "train.parquet" in out and "checksum" in out
    with pytest.raises(KdpipeError, match="checksum"):
        logit_store.read_split(path)


def test_a_cache_from_a_future_format_is_refused(cache_dir, tmp_path):
    path = tmp_path / "future.parquet"
    table = read_cache_table(cache_dir / "test.parquet")
    meta = json.loads(table.schema.metadata[b"kdpipe"])
    meta["format_version"] = logit_store.FORMAT_VERSION + 1
    pq.write_table(table.replace_schema_metadata({b"kdpipe": json.dumps(meta).encode()}), path)
    with pytest.raises(KdpipeError, match="newer kdpipe"):
        logit_store.read_split(path)


def test_ids_fall_back_to_content_hashes_for_parquet_data(teacher_dir, tmp_path):
    import datasets

    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)] * 2  # duplicates too
    ds = datasets.Dataset.from_dict({"img": images, "labels": [0, 1, 2, 0, 1, 2]},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "labels": datasets.ClassLabel(names=CLASSES)}))
    ds.to_parquet(tmp_path / "d.parquet")
    opened = open_dataset(str(tmp_path / "d.parquet"))
    ids = opened.splits["train"].ids
    assert len(set(ids)) == 6 and all(i.startswith("sha256:") for i in ids)
    assert opened.image_column == "img" and opened.label_column == "labels"


@pytest.mark.skipif(not (SHARED / "beans").is_dir(), reason="../shared (real Beans and teacher) is absent")
def test_real_teacher_on_real_beans_matches_a_direct_forward(tmp_path):
    folder = tmp_path / "beans"
    for cls in CLASSES:  # four real images per class
        (folder / "test" / cls).mkdir(parents=True)
        for p in sorted((SHARED / "beans" / "test" / cls).glob("*.jpg"))[:4]:
            shutil.copy(p, folder / "test" / cls / p.name)
    teacher = SHARED / "teachers" / "beans-efficientnet-lite0"
    reports = cache_teacher.run(CacheConfig(teacher=str(teacher), dataset=str(folder), out=tmp_path / "c",
                                            precision="fp32", workers=0))
    ids, ref = direct_logits(teacher, folder, "test")
    got = cached(tmp_path / "c", "test")
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), ref, atol=1e-4, rtol=1e-4)
    assert reports[0].accuracy >= 0.75  # a real fine-tuned teacher (97.7% on the whole test split)
