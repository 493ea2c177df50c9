"""Open an image-classification dataset (hub id, image folder, Parquet/Arrow) as splits of examples
with stable ids, RGB images and label names.

An example's id is its image's path relative to the dataset root where there is one (an image folder),
else the SHA-256 of its bytes. Ids, not positions, join cached logits to examples.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import hub
from .errors import KdpipeError

if TYPE_CHECKING:  # imported where used: datasets takes seconds to import
    import datasets

IMAGE_COLUMNS = ("image", "img")
# The largest image file read: what Pillow decodes without a bomb warning (89 Mpx) as 8-bit RGB in a BMP or TIFF;
# a photo is a few MB. A Parquet entry naming a device (/dev/zero) or a huge file stops here, not in memory
MAX_IMAGE_BYTES = 256 << 20
LABEL_COLUMNS = ("label", "labels")
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class Split:
    """One split: the underlying table (images undecoded), ids, integer labels in `label_names` order."""

    name: str
    table: datasets.Dataset  # image column cast to decode=False
    image_column: str
    ids: list[str]
    labels: np.ndarray  # (N,) int64
    root: str | None = None  # the folder image paths are relative to, if local
    allowed: tuple[str, ...] | None = None  # the folders an entry's image file may lie in (None: anywhere)
    _fingerprint: str | None = field(default=None, repr=False)
    _digests: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def image_bytes(self, i: int) -> bytes:
        value = self.table[i][self.image_column]
        if value.get("bytes") is not None:
            return value["bytes"]
        return read_image_file(value["path"], self.root, self.allowed, f"row {i} of split {self.name!r}")

    def image(self, i: int) -> Image.Image:
        """The i-th image decoded to RGB; an unreadable file is an error naming it, never skipped."""
        return decode_rgb(self.image_bytes(i), where=f"{self.ids[i]} (split {self.name!r}, row {i})")

    def digests(self) -> np.ndarray:
        """(N, 32) uint8: the SHA-256 of each row's image bytes (read once; a cache stores them, so an image
        changed under the same id can be named)."""
        if self._digests is None:
            self._digests = np.array([np.frombuffer(hashlib.sha256(self.image_bytes(i)).digest(), np.uint8)
                                      for i in range(len(self))], dtype=np.uint8).reshape(len(self), 32)
        return self._digests

    def fingerprint(self) -> str:
        """SHA-256 over (id, label, SHA-256 of the image bytes) of every row, in order: equal fingerprints
        mean equal contents."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for id_, label, digest in zip(self.ids, self.labels.tolist(), self.digests()):
                h.update(f"{id_}\0{label}\0".encode())
                h.update(digest.tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


@dataclass
class ImageDataset:
    spec: str  # what the user passed: a hub id or a path
    kind: str  # "hub" or "local"
    revision: str | None
    label_names: list[str]
    image_column: str
    label_column: str
    root: str | None  # absolute folder of a local dataset
    splits: dict[str, Split]
    outside_images: bool = False  # --allow-outside-images: entries may name image files outside the dataset
    left_out: list[str] = field(default_factory=list)  # an image folder's files no split uses (_left_out)

    @property
    def identity(self) -> dict:
        allowed = {"outside_images": True} if self.outside_images else {}  # recorded, and reopened with it
        return {"spec": self.spec, "kind": self.kind, "revision": self.revision, "root": self.root,
                "image_column": self.image_column, "label_column": self.label_column, "label_names": self.label_names,
                **allowed}


def image_file(path: str | None, root: str | None, allowed: tuple[str, ...] | None, where: str) -> Path:
    """The file an image entry names (relative: to the dataset's folder), checked before it is opened: inside
    `allowed` (the dataset's folders; None: anywhere, as --allow-outside-images permits), a regular file (not a
    device such as /dev/zero, a pipe or a folder) and at most MAX_IMAGE_BYTES. `..` is resolved by name; a link
    inside the folder is followed (whoever made the folder put it there)."""
    if not path or "\0" in path:
        raise KdpipeError(f"{where} holds no image: neither its bytes nor a usable file path ({path!r}); fix the "
                          "dataset's entry")
    file = Path(path).expanduser()
    file = Path(os.path.abspath(Path(root) / file if root and not file.is_absolute() else file))
    if allowed is not None and not any(file.is_relative_to(a) for a in allowed):
        raise KdpipeError(f"{where} names the image file {file}, outside the dataset's folder {allowed[0]}; it was "
                          "not read (an image of another split or a system file would enter silently): move the "
                          "image into the dataset, or pass --allow-outside-images to read it (recorded)")
    try:
        info = file.stat()
    except OSError as e:
        raise KdpipeError(f"cannot read image {file} ({where}): {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KdpipeError(f"{where} names {file}, which is not a regular file (a device, a pipe or a folder); it was "
                          "not read: point the entry at an image file")
    if info.st_size > MAX_IMAGE_BYTES:
        raise KdpipeError(f"{where} names {file}, {info.st_size / 2**20:.0f} MiB: more than any image kdpipe reads "
                          f"({MAX_IMAGE_BYTES >> 20} MiB); downscale it")
    return file


def read_image_file(path: str, root: str | None, allowed: tuple[str, ...] | None, where: str) -> bytes:
    """An image entry's file (image_file's checks), read to at most MAX_IMAGE_BYTES."""
    file = image_file(path, root, allowed, where)
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        raise KdpipeError(f"cannot read image {file}: {e.strerror}") from None
    if len(data) > MAX_IMAGE_BYTES:  # it grew since it was checked
        raise KdpipeError(f"{where} names {file}, more than {MAX_IMAGE_BYTES >> 20} MiB; downscale it")
    return data


def decode_rgb(data: bytes, where: str) -> Image.Image:
    """Decode image bytes to an 8-bit RGB PIL image, whatever the mode (L, P, RGBA, CMYK, 16-bit, ...).

    Transparency is composited on white (as transformers' `convert_rgb` does); 16-bit images are scaled
    to 8 bits rather than clipped; EXIF orientation is applied.
    """
    if not data:
        raise KdpipeError(f"image {where} is empty (0 bytes); remove or replace the file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise KdpipeError(f"image {where} is too large to decode safely ({e}); downscale it") from None
    except UnidentifiedImageError:
        raise KdpipeError(f"cannot decode image {where}: not an image format Pillow can read; fix or remove "
                          "the file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise KdpipeError(f"cannot decode image {where}: {e}; fix or remove the file") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_dataset(
    spec: str,
    *,
    splits: list[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    revision: str | None = None,
    flags: dict[str, str] | None = None,
    allow_outside: bool = False,
) -> ImageDataset:
    """Open `spec` (hub id, image folder, or Parquet/Arrow file or folder) with ids and label names.
    `flags` names the flag that asked for each split (e.g. {"validation": "--val-split"}) in errors;
    --splits otherwise. An entry naming an image file (not holding its bytes) must name a regular file inside
    the dataset's folder (image_file), unless `allow_outside` (--allow-outside-images, recorded in `identity`)."""
    dsd, kind, root = _load(spec, revision)
    allowed = None if allow_outside else _image_roots(spec, kind, root)
    folder = _image_folder(dsd, spec)
    available = list(dsd.keys())
    wanted = list(dict.fromkeys(splits or available))
    flags = flags or {}
    missing = [s for s in wanted if s not in dsd]
    if missing:
        flag = flags.get(missing[0], "--splits")
        named = missing[:1] if flag != "--splits" else missing
        raise KdpipeError(f"{flag} {','.join(named)}: not in dataset {spec} (it has: {', '.join(available)})")
    first = dsd[wanted[0]]
    img_col = _pick_column(first, image_column, IMAGE_COLUMNS, "Image", "--image-column", spec)
    if folder is not None and label_column is None and not set(LABEL_COLUMNS) & set(first.column_names):
        raise KdpipeError(_no_class_folders(spec, folder))
    lab_col = _pick_column(first, label_column, LABEL_COLUMNS, "ClassLabel", "--label-column", spec)
    label_names = _label_names(dsd, wanted, lab_col)
    out = {}
    for name in wanted:
        table = dsd[name]
        if len(table) == 0:
            fix = f"choose another {flags[name]}" if name in flags else "drop it with --splits"
            raise KdpipeError(f"split {name!r} of dataset {spec} has no rows; {fix}")
        for col in (img_col, lab_col):
            if col not in table.column_names:
                raise KdpipeError(f"split {name!r} of {spec} has no column {col!r}")
        table = _undecoded(table, img_col)
        labels = _labels(table, lab_col, label_names)
        _check_image_files(table, img_col, root, allowed, name)
        ids = _example_ids(table, img_col, root, allowed)
        out[name] = Split(name, table, img_col, ids, labels, root, allowed)
    return ImageDataset(spec=spec, kind=kind, revision=revision, label_names=label_names, image_column=img_col,
                        label_column=lab_col, root=root, splits=out, outside_images=allow_outside,
                        left_out=_left_out(folder, dsd, img_col) if folder is not None else [])


# ------------------------------------------------------------------------ an image folder's every file


def _image_folder(dsd, spec: str) -> Path | None:
    """The folder of a local dataset that datasets read as an image folder (split/class/file), else None."""
    path = Path(spec).expanduser()
    first = next(iter(dsd.values()), None)
    return path.resolve() if path.is_dir() and first is not None and first.info.builder_name == "imagefolder" else None


def _image_extensions() -> set[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {e.lower() for e in ImageFolder.EXTENSIONS}


def _files_under(folder: Path) -> tuple[list[str], list[str]]:
    """Every file under `folder` (hidden ones too; relative, posix) and every folder with no file below it."""
    found, empty = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath).relative_to(folder)
        found += [(here / f).as_posix() for f in filenames]
        if not filenames and not dirnames and here != Path("."):
            empty.append(here.as_posix() + "/")
    return found, empty


def _left_out(folder: Path, dsd, col: str) -> list[str]:
    """The files under an image folder that no split of the loaded dataset uses (datasets skips, without a word,
    non-images, names with a line break, folders starting with . or __), and the empty folders (a class folder
    with no images is no class), relative to the folder, sorted: images first."""
    import pyarrow.compute as pc

    used = set()
    for table in dsd.values():
        for path in pc.struct_field(table.data.column(col), "path").to_pylist():
            if path:
                used.add(Path(os.path.relpath(path, folder)).as_posix())
    found, empty = _files_under(folder)
    images = _image_extensions()
    return sorted((f for f in found if f not in used), key=lambda f: (Path(f).suffix.lower() not in images, f)) + empty


def left_out_note(spec: str, left_out: list[str], shown: int = 3) -> str | None:
    """One line naming what an image folder holds that was not used (ImageDataset.left_out), by kind, a few
    names of each; None when nothing."""
    if not left_out:
        return None
    images = _image_extensions()
    kinds = {"image(s) the loader skips (rename them: no line break, no part starting with . or __)": [],
             "empty folder(s)": [], "file(s) that are not images": []}
    for f in left_out:
        kind = 1 if f.endswith("/") else 0 if Path(f).suffix.lower() in images else 2
        list(kinds.values())[kind].append(f)
    parts = [f"{len(fs)} {kind}: " + ", ".join(json.dumps(f, ensure_ascii=False) for f in fs[:shown])
             + (", ..." if len(fs) > shown else "") for kind, fs in kinds.items() if fs]
    return f"not used from {spec}: " + "; ".join(parts)


def _no_class_folders(spec: str, folder: Path) -> str:
    """Why datasets found no class folders in an image folder: its images are not all at one depth, a name holds
    a backslash (read as a separator), or there is one class only. Names the files that break the layout."""
    images = _image_extensions()
    paths = [f for f in _files_under(folder)[0] if Path(f).suffix.lower() in images]
    depths = {}
    for f in paths:
        depths.setdefault(len(Path(f).parts), []).append(f)
    common = max(depths, key=lambda d: len(depths[d]), default=0)
    odd = sorted({f for f in paths if "\\" in f} | {f for d, fs in depths.items() if d != common for f in fs})
    if odd:
        named = ", ".join(json.dumps(f, ensure_ascii=False) for f in odd[:5]) + (", ..." if len(odd) > 5 else "")
        return (f"--dataset {spec}: no class folders found, because {len(odd)} image(s) are not at split/class/file "
                f"like the others or have a backslash in their name ({named}); move or rename them")
    return (f"--dataset {spec}: no class folders found (an image folder needs split/class/image files and at least "
            "two classes); arrange it so, or pass --label-column for a metadata file's column")

def _image_roots(spec: str, kind: str, root: str | None) -> tuple[str, ...]:
    """Where a dataset's image files may lie: its folder (as given and as resolved), or for a Hub dataset the
    caches the libraries download into."""
    if kind == "local":
        given = Path(spec).expanduser()
        given = given if given.is_dir() else given.parent
        return tuple(dict.fromkeys([root, os.path.abspath(given), str(given.resolve())]))
    import datasets
    import huggingface_hub

    return (os.path.abspath(datasets.config.HF_DATASETS_CACHE), os.path.abspath(huggingface_hub.constants.HF_HUB_CACHE))


def _check_image_files(table, col: str, root: str | None, allowed: tuple[str, ...] | None, split: str) -> None:
    """Every entry that names a file instead of holding its bytes, checked (image_file) before anything is read."""
    for i, value in enumerate(table[col]):
        if value.get("bytes") is None:
            image_file(value.get("path"), root, allowed, f"row {i} of split {split!r}")


def _load(spec: str, revision: str | None):
    import datasets

    from . import demo

    path = Path(demo.resolve(spec, "dataset")).expanduser()
    _refuse_empty_parquet(path)
    _refuse_undecodable_names(path)
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise KdpipeError(f"--dataset {spec}: a file must be .parquet or .arrow (or pass a folder)")
            return datasets.load_dataset(builder, data_files={"train": str(path)}), "local", str(path.parent)
        if path.is_dir():
            return datasets.load_dataset(str(path)), "local", str(path.resolve())
        if not looks_like_hub_id(spec):
            raise KdpipeError(f"--dataset {spec}: no such file or folder")
        hub.require("--dataset", spec, "a local image folder or Parquet files instead, e.g. --dataset ../shared/beans")
        return datasets.load_dataset(spec, revision=revision), "hub", None
    except KdpipeError:
        raise
    except (ConnectionError, OSError) as e:
        if path.exists():
            raise KdpipeError(f"--dataset {spec}: cannot read it ({e})") from None
        raise KdpipeError(
            f"--dataset {spec}: could not load it from the Hugging Face Hub ({type(e).__name__}); "
            "offline? pass a local image folder or Parquet files instead, e.g. --dataset ../shared/beans"
        ) from None
    except Exception as e:  # datasets raises many types for "not a dataset" (DataFilesNotFoundError, ...)
        raise KdpipeError(f"--dataset {spec}: cannot open it as a dataset ({type(e).__name__}: {e})") from None


def _refuse_undecodable_names(path: Path) -> None:
    """A file name that is not UTF-8 makes datasets fail with "An error occurred while generating the dataset",
    naming nothing: name it here."""
    if not path.is_dir():
        return
    for name in (n for paths in _files_under(path) for n in paths):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise KdpipeError(f"--dataset {path}: the file name {ascii(name)} is not UTF-8, which the dataset loader "
                              "cannot read; rename it") from None


def _refuse_empty_parquet(path: Path) -> None:
    """datasets fails on a 0-row or a truncated Parquet file with a message that does not name it: name it
    here."""
    import pyarrow.parquet as pq

    files = [path] if path.suffix == ".parquet" else sorted(path.rglob("*.parquet")) if path.is_dir() else []
    for f in files:
        try:
            rows = pq.read_metadata(f).num_rows
        except Exception as e:  # truncated or damaged: no footer to read
            raise KdpipeError(f"--dataset: {f} is not a readable Parquet file ({type(e).__name__}); restore it, or "
                              "remove it and choose the other splits with --splits") from None
        if rows == 0:
            raise KdpipeError(f"--dataset: {f} has no rows (an empty split cannot be cached); remove the file "
                              "or choose the other splits with --splits")


def _pick_column(table, override, candidates, feature_type, flag, spec) -> str:
    cols = table.column_names
    if override is not None:
        if override not in cols:
            raise KdpipeError(f"{flag} {override!r}: no such column in {spec} (columns: {', '.join(cols)})")
        return override
    for c in candidates:
        if c in cols:
            return c
    typed = [c for c, f in table.features.items() if type(f).__name__ == feature_type]
    if len(typed) == 1:
        return typed[0]
    raise KdpipeError(f"cannot tell which column of {spec} to use; pass {flag} (columns: {', '.join(cols)})")


def _label_names(dsd, splits, col) -> list[str]:
    feature = dsd[splits[0]].features[col]
    if hasattr(feature, "names"):
        return [str(n) for n in feature.names]
    values = set()
    for s in splits:
        values.update(dsd[s][col])
    if all(isinstance(v, str) for v in values):
        return sorted(values)
    if all(isinstance(v, (int, np.integer)) and v >= 0 for v in values):
        return [str(i) for i in range(max(values) + 1)]
    raise KdpipeError(f"label column {col!r} holds neither class names nor class indices; pass --label-column")


def _labels(table, col, label_names) -> np.ndarray:
    values = table[col]
    if values and isinstance(values[0], str):
        index = {n: i for i, n in enumerate(label_names)}
        return np.array([index[v] for v in values], dtype=np.int64)
    labels = np.asarray(values, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(label_names)):
        raise KdpipeError(f"label column {col!r} has values outside 0..{len(label_names) - 1}")
    return labels


def _undecoded(table, col):
    import datasets

    feature = table.features[col]
    if isinstance(feature, datasets.Image):
        return table.cast_column(col, datasets.Image(decode=False))
    raise KdpipeError(f"column {col!r} does not hold images (it is {feature}); pass --image-column")


def _example_ids(table, col, root: str | None, allowed: tuple[str, ...] | None) -> list[str]:
    """Relative image paths where every row has a distinct one, else content hashes (made unique)."""
    values = table[col]
    paths = [v.get("path") for v in values]
    if root and all(p and os.path.isabs(p) for p in paths):
        ids = [Path(os.path.relpath(p, root)).as_posix() for p in paths]
        if len(set(ids)) == len(ids):
            return ids
    if all(paths) and len(set(paths)) == len(paths):
        return [Path(p).as_posix() for p in paths]
    ids, seen = [], {}
    for v in values:
        data = v["bytes"] if v.get("bytes") is not None else read_image_file(v["path"], root, allowed, "an entry")
        h = "sha256:" + hashlib.sha256(data).hexdigest()[:32]
        seen[h] = seen.get(h, 0) + 1
        ids.append(h if seen[h] == 1 else f"{h}#{seen[h] - 1}")
    return ids


def looks_like_hub_id(spec: str) -> bool:
    """`name` or `owner/name`; anything starting with . / ~ or deeper than one slash is a path."""
    return not spec.startswith((".", "/", "~")) and spec.count("/") <= 1 and "\\" not in spec


def slug(spec: str) -> str:
    """A folder-name-safe short name for a hub id or path: `merve/beans-vit-224` -> `merve--beans-vit-224`."""
    p = Path(spec)
    name = spec.replace("/", "--") if looks_like_hub_id(spec) and not p.exists() else p.resolve().name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "dataset"


def reopen_dataset(identity: dict, override: str | None, splits: list[str], image_column=None, label_column=None,
                   flags: dict[str, str] | None = None, allow_outside: bool = False):
    """Open the dataset an artifact was made from (or `override`, e.g. the same data moved), with the
    permission to read images outside its folder it was made with (or `allow_outside`)."""
    spec = override or identity["spec"]
    if override is None and identity["kind"] == "local" and not Path(spec).exists() and identity.get("root"):
        spec = identity["root"]  # recorded as a relative path from another working folder
    if override is None and identity["kind"] == "local" and not Path(spec).expanduser().exists():
        raise KdpipeError(f"--dataset: the recorded dataset {spec} is gone (moved or deleted); pass --dataset PATH "
                          "to where it is now")
    return open_dataset(spec, splits=splits, image_column=image_column or identity.get("image_column"),
                        label_column=label_column or identity.get("label_column"), flags=flags,
                        allow_outside=allow_outside or identity.get("outside_images", False))
