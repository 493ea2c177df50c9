"""Train the embedded demo teacher: a small ViT on the demo digits' train split, from scratch, on the CPU.

A demo, not a Beans teacher: it exists so that kdpipe's whole pipeline runs on any machine with no network
(`kdpipe demo`). ViT as in the design (the guide's teacher is a ViT), sized for 32-px digits: patch 4
(8x8 = 64 tokens), hidden 96, 4 layers of 4 heads, MLP 384: 0.46 M parameters, 1.8 MB in safetensors.

Recipe: AdamW (lr 5e-4, weight decay 0.05), batch 16, cosine decay after 2 warm-up epochs, label smoothing
0.1, random shifts of up to 2 px (the images are padded with black, as the digits' background), 40 epochs;
the weights of the last epoch are kept (validation is measured, not used to choose). Seeded: one seed gives
the same teacher on the same CPU kind and thread count (floating-point sums may differ on another).

    python data/demo/train_teacher.py                    # writes data/demo/digits-vit/ (40 epochs of 1,257 images)
    python data/demo/train_teacher.py --seed 1 --out /tmp/t1   # another seed, for the spread
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SIZE, PATCH, SHIFT = 32, 4, 2
MEAN, STD = 0.5, 0.5  # the processor's normalisation (grey levels are replicated to 3 channels)


def load_split(name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, 3, SIZE, SIZE) float in [0, 1], (N,) labels, label names: decoded as kdpipe decodes (grey -> RGB)."""
    import datasets

    table = datasets.load_dataset("parquet", data_files={name: str(HERE / "digits" / f"{name}.parquet")})[name]
    pixels = np.stack([np.asarray(example["image"].convert("RGB")) for example in table])  # (N, H, W, 3) uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    return images, torch.tensor(table["label"]), table.features["label"].names


def shifted(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by a random whole-pixel offset in [-SHIFT, SHIFT] on both axes, padded with black."""
    padded = F.pad(images, (SHIFT,) * 4)
    dx, dy = torch.randint(0, 2 * SHIFT + 1, (2, len(images)), generator=generator)
    return torch.stack([p[:, y:y + SIZE, x:x + SIZE] for p, x, y in zip(padded, dx.tolist(), dy.tolist())])


def build(names: list[str]):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=SIZE, patch_size=PATCH, num_channels=3, hidden_size=96, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=384, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=len(names),
                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    return ViTForImageClassification(config)


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    logits = torch.cat([model(pixel_values=(x - MEAN) / STD).logits for x in images.split(256)])  # (N, C)
    return (logits.argmax(1) == labels).float().mean().item()


def train(seed: int, epochs: int, batch: int, lr: float, warmup: int = 2):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y, names = load_split("train")
    model = build(names)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps, per_epoch = epochs * math.ceil(len(x) / batch), math.ceil(len(x) / batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / (warmup * per_epoch),
                                                                    0.5 * (1 + math.cos(math.pi * s / steps))))
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=generator).split(batch):
            inputs = (shifted(x[idx], generator) - MEAN) / STD  # (B, 3, SIZE, SIZE)
            loss = F.cross_entropy(model(pixel_values=inputs).logits, y[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}", flush=True)
    return model, names


CARD = """---
library_name: transformers
pipeline_tag: image-classification
tags: [kdpipe, demo, vit]
metrics: [accuracy]
---
# digits-vit: kdpipe's embedded demo teacher

**A demo, not a Beans teacher.** A {params:,}-parameter ViT (patch {patch}, hidden 96, 4 layers, 4 heads) trained
from scratch on the train split of kdpipe's embedded digits dataset (`data/demo/digits`: the UCI handwritten
digits shipped with scikit-learn, 32-px grey images, 10 classes) by `data/demo/train_teacher.py --seed {seed}`, so that
`kdpipe demo` runs the whole distillation pipeline on any machine with no network.

| split | images | accuracy |
|---|---|---|
| validation | {n_val} | {val:.1%} |
| test | {n_test} | {test:.1%} |

Training: {epochs} epochs, AdamW lr {lr:g}, weight decay 0.05, batch {batch}, cosine after 2 warm-up epochs, label
smoothing 0.1, random shifts of up to 2 px; the last epoch's weights. Measured in fp32 on {cpu}, {seconds:.0f} s
on {threads} thread(s). torch {torch}, transformers {transformers}.
"""


def main() -> None:
    import transformers
    from transformers import ViTImageProcessor

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    # batch 16 at lr 5e-4: 80 steps an epoch; at batch 64 (lr 1e-3 or 2e-3) the loss stayed at chance for 4 epochs
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", type=Path, default=HERE / "digits-vit")
    args = ap.parse_args()
    start = time.perf_counter()
    model, names = train(args.seed, args.epochs, args.batch_size, args.lr)
    seconds = time.perf_counter() - start
    (xv, yv, _), (xt, yt, _) = load_split("validation"), load_split("test")
    val, test = accuracy(model, xv, yv), accuracy(model, xt, yt)
    print(f"validation {val:.1%}  test {test:.1%}  ({seconds:.0f} s)")
    model.save_pretrained(args.out)
    ViTImageProcessor(do_resize=True, size={"height": SIZE, "width": SIZE}, do_rescale=True, rescale_factor=1 / 255,
                      do_normalize=True, image_mean=[MEAN] * 3, image_std=[STD] * 3).save_pretrained(args.out)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    record = {"seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "validation_accuracy": val, "test_accuracy": test,
              "n_validation": len(yv), "n_test": len(yt), "train_seconds": round(seconds, 1), "cpu": cpu,
              "threads": torch.get_num_threads(), "precision": "fp32", "torch": torch.__version__,
              "transformers": transformers.__version__, "parameters": sum(p.numel() for p in model.parameters())}
    (args.out / "TEACHER.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "README.md").write_text(CARD.format(params=record["parameters"], patch=PATCH, seed=args.seed,
                                                    n_val=len(yv), n_test=len(yt), val=val, test=test,
                                                    epochs=args.epochs, lr=args.lr, batch=args.batch_size, cpu=cpu, seconds=seconds,
                                                    threads=record["threads"], torch=torch.__version__,
                                                    transformers=transformers.__version__))


if __name__ == "__main__":
    main()
