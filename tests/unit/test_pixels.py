"""pixels and the two modules split from it, view_source and pillow_resample (tested together: they share the
odd-sized folder and the views drawn on it). Views rendered when used (pixels.Originals, view_source.ViewSource):
the decode-once originals are the decoded images, capped; rendering from them, in place or on background threads,
gives the bytes of the prebuilt view store (pixels.load_or_build_views) at any size, mixed views included; a fresh
view every epoch; the device resampler is Pillow's bit for bit. The pixel store (pixels.load_or_build): the
student's inputs decoded once, as the teacher's processor makes them, keyed by contents, rebuilt when damaged."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe import data, pillow_resample, pixels, view_source, views
from kdpipe.errors import KdpipeError

POLICY = views.ViewPolicy(mixup=1.0, mixup_p=0.5)
K = 5


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """Images of several sizes and modes (RGB, L, P, RGBA): the originals keep each at its own resolution."""
    root = tmp_path_factory.mktemp("odd") / "ds"
    rng = np.random.default_rng(0)
    shapes = [(40, 40), (37, 53), (64, 29), (50, 50), (33, 47), (45, 31)]
    for j, (h, w) in enumerate(shapes):
        folder = root / "train" / ("a" if j % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img = [img, img.convert("L"), img.convert("P"), img.convert("RGBA")][j % 4]
        img.save(folder / f"img{j}.png")
    return root


def _split(folder):
    return data.open_dataset(str(folder), splits=["train"]).splits["train"]


def _views(split, k=K, policy=POLICY):
    """Boxes (N, V, 4), flips (N, V) and Mixes (rows i * V + v, partners as split indices), as stage one draws them."""
    n = len(split)
    sizes = [split.image(i).size for i in range(n)]
    boxes, flips, parts = [], [], []
    for i in range(n):
        b, f = views.sample(policy, split.ids[i], *sizes[i], k)
        boxes.append(b)
        flips.append(f)
        parts.append(views.sample_mixes(policy, split.ids, i, k, lambda j: sizes[j]))
    mixes = views.Mixes(*(np.concatenate([getattr(m, f) for m in parts]) for f in ("partners", "boxes", "flips",
                                                                                      "weights")))
    return np.stack(boxes), np.stack(flips), mixes


def test_originals_are_the_decoded_images_stored_once(odd_folder, tmp_path, monkeypatch):
    split = _split(odd_folder)
    store = pixels.load_or_build_originals(split, root=tmp_path)
    assert len(store) == len(split)
    for i in range(len(split)):
        decoded = np.asarray(split.image(i))
        np.testing.assert_array_equal(store.array(i), decoded)  # source resolution, RGB
        np.testing.assert_array_equal(np.asarray(store.image(i)), decoded)
    assert store.nbytes == sum(np.asarray(split.image(i)).nbytes for i in range(len(split)))
    folder = next(tmp_path.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["train.originals.json", "train.originals.npy",
                                                        "train.originals.u8"]  # no temporaries left
    monkeypatch.setattr(type(split), "image", lambda self, i: pytest.fail("decoded again"))
    again = pixels.load_or_build_originals(split, root=tmp_path)  # reused, not rebuilt
    np.testing.assert_array_equal(again.array(2), store.array(2))


@pytest.mark.parametrize("store", ["pixels", "originals"])
def test_a_store_whose_build_fails_leaves_nothing_and_says_which(odd_folder, tmp_path, monkeypatch, store):
    """A disk that fills up mid-build: a one-line error naming the store, no temporary and no store left."""
    split = _split(odd_folder)
    real = type(split).image

    def image(self, i):
        if i == 3:
            raise OSError(28, "No space left on device")
        return real(self, i)

    monkeypatch.setattr(type(split), "image", image)
    build = {"pixels": lambda: pixels.load_or_build(split, (16, 16), 2, root=tmp_path),
             "originals": lambda: pixels.load_or_build_originals(split, root=tmp_path)}[store]
    with pytest.raises(KdpipeError, match=f"cannot write the {'pixel' if store == 'pixels' else 'originals'} store .*"
                                          "No space left on device; free space"):
        build()
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    assert len(build()) == len(split)  # built whole by the next call


def test_originals_over_the_cap_are_decoded_when_used(odd_folder, tmp_path, monkeypatch):
    split = _split(odd_folder)
    assert pixels.load_or_build_originals(split, root=tmp_path, max_bytes=5000) is None  # the first image: 4,800 B
    calls = []
    real = type(split).image
    monkeypatch.setattr(type(split), "image", lambda self, i: calls.append(i) or real(self, i))
    assert pixels.load_or_build_originals(split, root=tmp_path, max_bytes=5000) is None and calls == []  # marker
    assert not list(next(tmp_path.iterdir()).glob("*.u8"))
    monkeypatch.undo()
    assert len(pixels.load_or_build_originals(split, root=tmp_path)) == len(split)  # a larger cap builds it


@pytest.mark.parametrize("size", [(32, 32), (24, 20)], ids=["teacher-size", "other-size"])
def test_views_rendered_when_used_are_the_prebuilt_store_bit_for_bit(odd_folder, tmp_path, size):
    split = _split(odd_folder)
    boxes, flips, mixes = _views(split)
    assert (mixes.weights > 0).sum() >= 5
    prebuilt = pixels.load_or_build_views(split, size, 2, boxes, flips, root=tmp_path, mixes=mixes)  # (N * V, H, W, 3)
    originals = pixels.load_or_build_originals(split, root=tmp_path)
    rows = np.arange(len(split) * (K + 1))
    for image in (originals.image, split.image):  # from the originals, or decoded when used (over the cap)
        source = view_source.ViewSource(image, boxes, flips, size, 2, mixes)
        np.testing.assert_array_equal(source.render(rows), prebuilt)
    unmixed = view_source.ViewSource(originals.image, boxes, flips, size, 2)
    plain = pixels.load_or_build_views(split, size, 2, boxes, flips, root=tmp_path)
    np.testing.assert_array_equal(unmixed.render(rows), plain)


def test_background_rendering_gives_the_same_batches_in_any_order_of_asking(odd_folder, tmp_path):
    split = _split(odd_folder)
    boxes, flips, mixes = _views(split)
    originals = pixels.load_or_build_originals(split, root=tmp_path)
    source = view_source.ViewSource(originals.image, boxes, flips, (16, 16), 3, mixes, threads=2, depth=2)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(source), 4, replace=False) for _ in range(7)]
    expected = [source.render(b) for b in batches]
    source.plan(batches)
    for b, e in zip(batches, expected):
        np.testing.assert_array_equal(source.take(b), e)
    source.plan(batches)
    np.testing.assert_array_equal(source.take(batches[3]), expected[3])  # 0-2 skipped: dropped from the plan
    assert len(source._plan) == 3
    np.testing.assert_array_equal(source.take(batches[0]), expected[0])  # not planned any more: rendered in place
    np.testing.assert_array_equal(source.take(batches[4]), expected[4])
    source.close()

    def broken(i):
        raise KdpipeError(f"cannot decode image {i}")

    bad = view_source.ViewSource(broken, boxes, flips, (16, 16), 2, threads=1)
    bad.plan(batches[:2])
    with pytest.raises(KdpipeError, match="cannot decode image"):  # raised where the batch is taken
        bad.take(batches[0])
    bad.close()


def test_a_split_data_batch_renders_this_epochs_view(odd_folder, tmp_path):
    from kdpipe.train_student import SplitData

    split = _split(odd_folder)
    boxes, flips, _ = _views(split)
    n, v = flips.shape
    originals = pixels.load_or_build_originals(split, root=tmp_path)
    source = view_source.ViewSource(originals.image, boxes, flips, (16, 16), 2)
    logits = torch.randn(n * v, 2)
    train = SplitData("train", split.ids, None, torch.from_numpy(split.labels), logits, per_image=v, source=source)
    train.view_of = torch.from_numpy(views.epoch_views(n, v, 3, seed=0))
    order = torch.randperm(n)
    train.plan([order[:4], order[4:]])
    for idx in (order[:4], order[4:]):
        batch = train.batch(idx, torch.device("cpu"))
        rows = (idx * v + train.view_of[idx]).numpy()
        np.testing.assert_array_equal(batch["pixels"].numpy(), source.render(rows))
        torch.testing.assert_close(batch["teacher_logits"], logits[rows], atol=0, rtol=0)


def test_with_at_least_as_many_views_as_epochs_no_view_is_used_twice():
    for k, epochs in ((29, 30), (99, 100), (300, 300)):
        seen = np.stack([views.epoch_views(64, k + 1, e, seed=3) for e in range(epochs)])  # (epochs, images)
        assert all(len(set(seen[:, i])) == epochs for i in range(64))  # a fresh view every epoch, for every image


# ------------------------------------------------------------------ rendering in batches on a device (on CPU here)


def test_the_device_resampler_is_pillow_bit_for_bit():
    """pillow_resample.resample_batch against PIL's resize with a box: random sizes up and down, both orders of the two
    passes (Pillow 13 runs the vertical one first when the height shrinks much more), three filters."""
    rng = np.random.default_rng(0)
    cases = 0
    for trial in range(40):
        h, w = (int(x) for x in rng.integers(8, 70, 2))
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                  rng.integers(0, 256, (h + int(rng.integers(0, 9)), max(4, w - 3), 3), dtype=np.uint8)]
        boxes = np.stack([views.sample(views.ViewPolicy(), f"{trial}-{j}", a.shape[1], a.shape[0], 1)[0][1]
                          for j, a in enumerate(images)])
        if trial % 3 == 0:
            boxes[0] = (0, 0, w, h)  # the whole image (view 0)
        size = (int(rng.integers(4, 90)), int(rng.integers(4, 90)))
        for resample in pillow_resample.FILTERS:
            out = pillow_resample.resample_batch(images, boxes, size, resample, torch.device("cpu")).numpy()
            expected = np.stack([views.render(Image.fromarray(a), b, False, size, resample)
                                 for a, b in zip(images, boxes)])
            np.testing.assert_array_equal(out, expected, err_msg=f"{[a.shape for a in images]} -> {size}, {resample}")
            cases += 1
    assert cases == 120
    assert pillow_resample.vertical_first(63, 29, (32, 32)) == pillow_resample.pillow_vertical_first()  # Pillow >= 13: True


def test_the_device_view_source_renders_what_the_threads_render(odd_folder, tmp_path):
    split = _split(odd_folder)
    boxes, flips, mixes = _views(split)
    originals = pixels.load_or_build_originals(split, root=tmp_path)
    for size, resample in (((24, 20), 2), ((32, 32), 3)):
        threads = view_source.ViewSource(originals.image, boxes, flips, size, resample, mixes)
        device = view_source.DeviceViewSource(originals.array, boxes, flips, size, resample, torch.device("cpu"), mixes)
        rows = np.arange(len(threads))
        batch = device.take(rows)
        assert isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8
        np.testing.assert_array_equal(batch.numpy(), threads.render(rows))  # flips and blends included
    with pytest.raises(ValueError, match="no device renderer"):
        view_source.DeviceViewSource(originals.array, boxes, flips, (8, 8), 1, torch.device("cpu"))  # LANCZOS


# ---------------------------------------------------------- the pixel store: the student's inputs decoded once


def test_student_inputs_equal_the_teacher_processor_output(image_folder, teacher_dir):
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(teacher_dir)
    split = data.open_dataset(str(image_folder), splits=["validation"]).splits["validation"]
    u8 = torch.from_numpy(np.stack([pixels.decode_resized(split, i, (32, 32), proc.resample) for i in range(4)]))
    ours = pixels.normalise(u8, torch.tensor(proc.image_mean), torch.tensor(proc.image_std))
    theirs = proc(images=[split.image(i) for i in range(4)], return_tensors="pt")["pixel_values"]
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # same uint8 pixels, same arithmetic


def test_the_pixel_store_is_built_once_and_keyed_by_contents(image_folder, tmp_path):
    split = data.open_dataset(str(image_folder), splits=["test"]).splits["test"]
    a = pixels.load_or_build(split, (32, 32), 2, root=tmp_path / "px")
    files = list((tmp_path / "px").rglob("*.npy"))
    mtime = files[0].stat().st_mtime_ns
    b = pixels.load_or_build(split, (32, 32), 2, root=tmp_path / "px")
    assert np.array_equal(a, b) and files[0].stat().st_mtime_ns == mtime
    pixels.load_or_build(split, (24, 24), 2, root=tmp_path / "px")
    assert len(list((tmp_path / "px").rglob("*.npy"))) == 2  # another resolution, another store


@pytest.mark.parametrize("damage", ["cut-short", "json", "json-gone"])
def test_a_damaged_pixel_store_is_built_again(image_folder, tmp_path, damage):
    """The store is derived data: cut short (a disk filled by something else, a bad copy) or with its JSON
    unreadable, it used to stop every run with a traceback (`mmap length is greater than file size`)."""
    split = data.open_dataset(str(image_folder), splits=["test"]).splits["test"]
    expected = np.array(pixels.load_or_build(split, (32, 32), 2, root=tmp_path / "px"))
    store = next((tmp_path / "px").rglob("*.npy"))
    if damage == "cut-short":
        with open(store, "r+b") as f:
            f.truncate(store.stat().st_size // 2)
    elif damage == "json":
        store.with_suffix(".json").write_text('{"ids": [')
    else:
        store.with_suffix(".json").unlink()
    again = pixels.load_or_build(split, (32, 32), 2, root=tmp_path / "px")
    assert np.array_equal(again, expected) and store.with_suffix(".json").exists()


def test_normalise_is_x_over_255_minus_mean_over_std_in_channels_last():
    u8 = torch.randint(0, 256, (2, 5, 4, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    x = pixels.normalise(u8, mean, std)
    assert x.shape == (2, 3, 5, 4) and x.is_contiguous(memory_format=torch.channels_last)
    by_hand = (u8.permute(0, 3, 1, 2).double() / 255 - mean.double()[:, None, None]) / std.double()[:, None, None]
    torch.testing.assert_close(x.double(), by_hand, atol=1e-6, rtol=0)


def test_an_image_is_decoded_to_rgb_and_resized_with_the_processors_filter(odd_folder):
    split = _split(odd_folder)
    h, w = np.asarray(split.image(1)).shape[:2]
    np.testing.assert_array_equal(pixels.decode_resized(split, 1, (h, w), 2), np.asarray(split.image(1)))
    out = {}
    for resample in (2, 3):  # BILINEAR, BICUBIC: the filter asked for, not a default
        out[resample] = pixels.decode_resized(split, 1, (24, 20), resample)
        expected = np.asarray(split.image(1).resize((20, 24), resample=Image.Resampling(resample)))
        assert out[resample].shape == (24, 20, 3) and out[resample].dtype == np.uint8
        np.testing.assert_array_equal(out[resample], expected)
    assert not np.array_equal(out[2], out[3])


def test_a_store_that_cannot_be_written_is_one_line_and_leaves_no_temporary(odd_folder, tmp_path, monkeypatch):
    split = _split(odd_folder)
    real = pixels.np.lib.format.open_memmap

    def full_disk(path, *args, **kwargs):
        real(path, *args, **kwargs)  # the temporary exists, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pixels.np.lib.format, "open_memmap", full_disk)
    with pytest.raises(KdpipeError, match=r"cannot write the pixel store .*train\.npy: No space left on device; free space"):
        pixels.load_or_build(split, (16, 16), 2, root=tmp_path)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    assert pixels.load_or_build(split, (16, 16), 2, root=tmp_path).shape == (len(split), 16, 16, 3)


def test_a_dead_builders_temporaries_are_swept_and_a_live_ones_kept(odd_folder, tmp_path):
    import subprocess
    import sys

    split = _split(odd_folder)
    folder = tmp_path / pixels.originals_key(split.fingerprint())
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(done.stdout), os.getppid()  # a process that has exited; one that runs
    stale = folder / f".train.originals.u8.tmp-{dead}"
    live = folder / f".train.originals.u8.tmp-{alive}"
    for p in (stale, live):
        p.write_bytes(b"partial")
    pixels.load_or_build_originals(split, root=tmp_path)
    assert not stale.exists() and live.exists()
