"""Write the embedded demo dataset: the UCI handwritten digits that scikit-learn ships, as Parquet.

Source: "Optical Recognition of Handwritten Digits", E. Alpaydin and C. Kaynak (1998), UCI Machine Learning
Repository (https://doi.org/10.24432/C50P49, CC BY 4.0); the copy bundled with scikit-learn
(`sklearn.datasets.load_digits`, BSD-3-Clause) is its test part: 1,797 images of 8x8 pixels, 17 grey levels
(0-16), digits 0-9 written by 43 people.

Each image is scaled to 0-255 and enlarged to 32x32 with bilinear interpolation (MobileNetV2 and a
patch-4 ViT need more than 8 pixels a side), saved as a grey PNG. Fixed stratified splits, seeded:
1,257 train / 270 validation / 270 test. Each row's image keeps a name, `digit-<index>.png` (its row
in scikit-learn's array), which kdpipe uses as the example's id.

    pip install scikit-learn && python data/demo/make_digits.py     # writes data/demo/digits/*.parquet
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "digits"
SIZE = 32  # pixels a side: a ViT patch of 4 gives 8x8 tokens; MobileNetV2's stride of 32 leaves 1x1
SPLIT_SEED = 0  # fixes the split for good: the committed files and the figures in docs/results.md use it
HELD_OUT = 270  # images each for validation and for test (15 % of 1,797)


def png(pixels: np.ndarray) -> bytes:
    """(8, 8) levels 0-16 -> the bytes of a SIZE x SIZE grey PNG."""
    img = Image.fromarray(np.round(pixels * 255 / 16).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    img.resize((SIZE, SIZE), Image.BILINEAR).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def splits(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of each split, stratified by digit."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    rest, test = train_test_split(rows, test_size=HELD_OUT, stratify=labels, random_state=SPLIT_SEED)
    train, validation = train_test_split(rest, test_size=HELD_OUT, stratify=labels[rest], random_state=SPLIT_SEED)
    return {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)}


def main() -> None:
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in splits(digits.target).items():
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": png(digits.images[i]), "path": f"digit-{i:04d}.png"} for i in rows],
             "label": digits.target[rows].tolist()}, features=features)
        table.to_parquet(OUT / f"{name}.parquet")
        print(f"{name}: {len(rows)} images, {(OUT / f'{name}.parquet').stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
