"""Measurement helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kdpipe import files, runtime
from kdpipe.errors import KdpipeError
from kdpipe.loss import distillation_loss


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers). CPU seconds per wall second
    below torch's thread count means the benchmark was starved of cores (a busy shared machine)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None, body: Callable[[argparse.Namespace], dict]) -> dict:
    """Parse `argv` (the command line when None), keep it as `args.argv` for the results' provenance, and run
    `body`; a KdpipeError is one line and exit 1."""
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    try:
        return body(args)
    except KdpipeError as e:
        sys.exit(f"error: {e}")


def write_result(path: Path, script: str, argv: list[str], record: dict) -> dict:
    """A benchmark's result as JSON, the command that made it first (its provenance); returns what it wrote."""
    result = {"command": " ".join(["python", f"benchmarks/{script}", *argv]), **record}
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, result)
    print(f"wrote {path}")
    return result


def busy_note(cores: dict[str, float]) -> str | None:
    threads = torch.get_num_threads()
    starved = [k for k, c in cores.items() if c < 0.75 * threads]
    if starved:
        return (f"note: {', '.join(starved)} kept fewer than {0.75 * threads:g} of {threads} cores busy: the machine "
                "was probably shared, so these figures are noisy; rerun on a quiet machine")
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def kd_step(forward, optimizer, x, labels, teacher_logits, device, precision, temperature: float, alpha: float) -> None:
    """The bare minimum of one training step: forward under autocast, the KD loss, backward, optimizer step.
    x: (B, 3, H, W) normalised, channels_last; labels: (B,); teacher_logits: (B, C) or None."""
    with runtime.autocast(device, precision):
        logits = forward(pixel_values=x).logits  # (B, C)
    distillation_loss(logits, labels, teacher_logits, temperature, alpha)["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def subset_folder(src: Path, dst: Path, train_images: int) -> Path:
    """Link the first `train_images` train images (sorted, across classes) and every other image into dst."""
    for split_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(split_dir.glob("*/*"))
        if split_dir.name == "train":
            files = files[::max(1, len(files) // train_images)][:train_images]  # spread over the classes
        for f in files:
            link = dst / split_dir.name / f.parent.name / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f.resolve())
    return dst
