"""The Hugging Face Hub model card (`model/README.md`) of a saved student, built from its run.json.

Pure: `render(run, name)` turns a run.json-like dict into text; train_student.finish writes it into the
model folder before that folder is renamed into place, so `model/` can be uploaded as it is (`hf upload`).

The card is YAML metadata between `---` lines (https://huggingface.co/docs/hub/model-cards): library_name,
pipeline_tag, tags, datasets, base_model and a `model-index` whose results follow the Hub's schema (task,
dataset with its split, metrics with type, value and name; values as fractions, as metrics.py reports
them). Then a short text: teacher, data fingerprint, recipe, metrics table and the command that reproduces
the run. `base_model` and `datasets` name Hub repositories, so they are written only for a teacher or a
dataset loaded from the Hub (a local folder's path would not resolve there); a local one is named in the
text with its checksum or fingerprint instead.
"""

from __future__ import annotations

import html
import re
import shlex
from pathlib import PurePath

import yaml

from dataclasses import fields

from .config import TRAIN_DEFAULTS, TrainConfig, set_by_flags
from .settings import option_names
from .data import looks_like_hub_id
from .loss import LOSSES

SPLITS = ("test", "validation")  # reported in this order; the best epoch is chosen on validation
# Settings that do not change what is trained (where it runs, where it is written), left out of the command.
NOT_RECIPE = ("out", "name", "resume", "device", "precision")
OPTIONS = {f.name: f for f in fields(TrainConfig) if f.metadata["cli"]}  # train-student's options
ALWAYS = ("cache", "dataset", "loss", "temperature", "alpha", "epochs", "seed")  # shown even at their default


def render(run: dict, name: str) -> str:
    """README.md text: YAML front matter (metadata(run, name)) and the card's body."""
    front = yaml.safe_dump(metadata(run, name), sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n{_body(run, name)}"


def metadata(run: dict, name: str) -> dict:
    cfg, teacher, dataset = run["config"], _teacher(run), run["dataset"]
    data_name = _dataset_name(dataset)
    tags = ["knowledge-distillation", "kdpipe", "image-classification", f"loss-{cfg.get('loss', 'kd')}"]
    meta = {"library_name": "transformers", "pipeline_tag": "image-classification", "tags": tags,
            "metrics": ["accuracy", "f1"]}
    if dataset.get("kind") == "hub":
        meta["datasets"] = [dataset["spec"]]
    if teacher and _on_hub(teacher):
        meta["base_model"] = teacher["spec"]
    results = []
    for split in SPLITS:
        m = run.get(split)
        if not m:
            continue
        title = split.capitalize()
        results.append({
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": data_name, "type": dataset["spec"] if dataset.get("kind") == "hub" else data_name,
                        "split": split, **({"revision": dataset["revision"]} if dataset.get("revision") else {})},
            "metrics": [{"type": "accuracy", "value": round(float(m["accuracy"]), 4), "name": f"{title} accuracy"},
                        {"type": "f1", "value": round(float(m["macro_f1"]), 4), "name": f"{title} macro-F1",
                         "args": {"average": "macro"}}]})
    meta["model-index"] = [{"name": name, "results": results}]
    return meta


def reproduce_command(run: dict) -> str:
    """The `kdpipe train-student` command of this run: its --recipe and the settings that differ from the defaults
    or the recipe's (and those in ALWAYS), the precision it ran in, never where it ran or was written."""
    cfg, recipe = run["config"], set(run["config"].get("from_recipe") or ())  # settings --recipe gives
    args = ["kdpipe", "train-student"]
    for key, value in cfg.items():
        if key in NOT_RECIPE or key not in OPTIONS:  # not an option, or one a later kdpipe dropped
            continue
        if key not in ALWAYS and (value == TRAIN_DEFAULTS[key] or key in recipe):
            continue
        if key == "student_config":
            value = {k: v for k, v in value.items() if f"student_config.{k}" not in recipe}
        flag, off = option_names(OPTIONS[key])
        if isinstance(value, bool):
            args += [flag] if value else ([off] if TRAIN_DEFAULTS[key] and off else [])
        elif value is None:
            args += [flag, ""] if key == "test_split" else []  # student, dataset, columns: the CLI's defaults too
        elif isinstance(value, dict):
            args += [flag, ",".join(f"{k}={v}" for k, v in value.items())] if value else []
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]  # repr: exact
    args += ["--precision", str(run.get("precision", cfg.get("precision", "auto")))]
    return " ".join(shlex.quote(a) for a in args)


def _body(run: dict, name: str) -> str:
    """The card's Markdown: what the model is, its teacher, data, recipe, results, and how to reproduce and use it."""
    sections = [[f"# {_text(name)}", "", _summary(run)], _teacher_section(run), _data_section(run), _recipe_section(run),
                _results_section(run), _export_section(run), _use_section(run)]
    return "\n".join(line for section in sections for line in section)


def _summary(run: dict) -> str:
    teacher, student = _teacher(run), run.get("student", {})
    arch = _text(student.get("architecture", "student"))
    params = f", {student['parameters'] / 1e6:.2f} M parameters" if student.get("parameters") else ""
    if run["config"]["alpha"] > 0 and teacher:
        return (f"A {arch} image classifier ({_labels(run)}{params}) trained by kdpipe with knowledge distillation "
                f"from cached logits of the teacher {_code(teacher['spec'])}; the teacher was run once over the data and "
                "never loaded in training.")
    if teacher:  # λ = 0 on the cache: its inputs are the distilled runs' (the teacher processor's)
        return (f"A {arch} image classifier ({_labels(run)}{params}) trained by kdpipe on the labels alone "
                f"(λ = 0) on the inputs of the teacher {_code(teacher['spec'])}'s cache: the from-scratch twin against "
                "which distillation from that cache is measured.")
    return (f"A {arch} image classifier ({_labels(run)}{params}) trained by kdpipe on the labels alone (λ = 0), "
            "without a teacher's cache (inputs normalised with mean and std 0.5).")


def _teacher_section(run: dict) -> list[str]:
    teacher, lines = _teacher(run), ["", "## Teacher", ""]
    if not teacher:
        return lines + ["None (λ = 0, trained without a cache)."]
    where = (f"Hub model {_code(teacher['spec'])}" + (f" at revision {_code(teacher['revision'])}"
                                                      if teacher.get("revision") else "")) if _on_hub(teacher) else \
        f"local folder {_code(teacher['spec'])} (weights sha256 {_code(teacher.get('weights_sha256'))})"
    acc = {n: s.get("teacher_accuracy") for n, s in run["cache"].get("splits", {}).items()}
    acc_text = ", ".join(f"{_text(n)} {a:.2%}" for n, a in acc.items() if isinstance(a, (int, float)))
    lines.append(f"{_text(teacher.get('architecture', 'teacher'))}: {where}; logits cached in "
                 f"{_text(run['cache'].get('precision', '?'))}" + (f"; its accuracy: {acc_text}." if acc_text else "."))
    if run["config"]["alpha"] == 0:
        lines.append("With λ = 0 the loss has no KD term: the teacher's logits were not used.")
    return lines


def _data_section(run: dict) -> list[str]:
    dataset = run["dataset"]
    lines = ["", "## Data", "",
             f"{'Hub dataset' if dataset.get('kind') == 'hub' else 'Local dataset'} {_code(dataset['spec'])}"
             + (f" (revision {_code(dataset['revision'])})" if dataset.get("revision") else "")
             + f", labels {', '.join(map(_code, run.get('label_names') or dataset.get('label_names', [])))}. Content "
             "fingerprints (sha256 over every example's id, image bytes and label):", ""]
    lines += [f"- {_text(split)}: {_code(fp)}" for split, fp in (run.get("dataset_fingerprints") or {}).items()]
    if "cache_matches_dataset_contents" in run:
        lines += ["", "The cached teacher logits were computed on exactly these contents: "
                  f"{'yes' if run['cache_matches_dataset_contents'] else 'no'}."]
    return lines


def _recipe_section(run: dict) -> list[str]:
    cfg = run["config"]
    loss = LOSSES.get(cfg.get("loss", "kd"))  # None: a loss this kdpipe does not have, named as run.json has it
    recipe = [("loss", (loss.title if loss else cfg["loss"]) + (" with logit standardisation (Sun et al., CVPR 2024)"
                                                                if cfg.get("standardize") else "")),
              ("combined as", "(1 − λ) · CE + λ · KD term"), ("temperature T", f"{cfg['temperature']:g}"),
              ("λ (alpha)", f"{cfg['alpha']:g}")]
    recipe += [(s.title, f"{cfg.get(s.field):g}") for s in (loss.settings if loss else ())]
    views = ("the cache's stored augmented views, one per image per epoch" if cfg.get("views")
             else "none (the images themselves)")
    optimizer = f"AdamW, lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g}, {cfg['schedule']} schedule"
    if cfg.get("recipe"):
        changed = set_by_flags(cfg)
        recipe.append(("preset", f"`--recipe {cfg['recipe']}`" + (f", flags setting {', '.join(changed)}" if changed else "")))
    recipe += [("epochs", str(cfg["epochs"])), ("best epoch (chosen on validation)", _best_epoch(run)),
               ("views", views), ("seed", str(run.get("seed", cfg.get("seed")))), ("optimizer", optimizer),
               ("batch size", str(cfg["batch_size"])), ("precision", str(run.get("precision", "?")))]
    if cfg.get("mix", "none") != "none":  # a run of a kdpipe that had --mix
        recipe.append(("batch mixing", f"{cfg['mix']}, Beta({cfg['mix_alpha']:g}, {cfg['mix_alpha']:g})"))
    return ["", "## Recipe", "", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in recipe]


TIE_RULES = {"nll": "the lowest validation NLL of them", "first": "the first of them"}


def _best_epoch(run: dict) -> str:
    """The kept epoch, and how it was picked where epochs tied on validation accuracy (run.json's
    best_epoch_rule; a run of a kdpipe before it kept the first of them)."""
    rule = run.get("best_epoch_rule")
    if not rule or rule["tied"] < 2:
        return str(run.get("best_epoch"))
    return f"{rule['epoch']} ({rule['tied']} epochs tied on validation accuracy; kept: {TIE_RULES[rule['rule']]})"


def _results_section(run: dict) -> list[str]:
    lines = ["", "## Results", "", "| split | accuracy | macro-F1 | agreement with the teacher | images |",
             "|---|---|---|---|---|"]
    for split in SPLITS:
        m = run.get(split)
        if m:
            agree = f"{m['teacher_agreement']:.2%}" if "teacher_agreement" in m else "–"
            lines.append(f"| {split} | {m['accuracy']:.2%} | {m['macro_f1']:.3f} | {agree} | {m.get('n', '?')} |")
    return lines + ["", "One run, one seed: compare runs over several seeds before drawing conclusions."]


def _export_section(run: dict) -> list[str]:
    """`kdpipe export`'s figures, where the run was exported: files, fidelity against the PyTorch student, and
    speed and size beside the teacher's, measured side by side in one process."""
    ex = run.get("export")
    if not ex:
        return []
    lines = ["", "## Deployment (ONNX)", ""]
    if ex.get("summary", {}).get("speedup"):
        s = ex["summary"]
        pp = f"{s['accuracy_pp']:+.1f} pp" if s.get("accuracy_pp") is not None else "an unmeasured difference in"
        lines += [f"**{s['speedup']:.1f}× faster and {s['smaller']:.1f}× smaller than its teacher, at {pp} "
                  f"{s['split']} accuracy** ({s['deployed']} student against the teacher exported the same way in fp32; "
                  "batch-1 median latency, file size).", ""]
    files_ = ", ".join(f"`{f}`" for f in ex["files"].values())
    lines += [f"{files_} (opset {ex['opset']}, torch.onnx {ex['exporter']} exporter, dynamic batch; "
              "input `pixel_values` (B, 3, H, W) normalised as `preprocessor_config.json` says, output `logits`)."]
    if ex.get("int8"):
        q = ex["int8"]
        lines += ["", f"int8: ONNX Runtime {q['method']} quantisation, {q['format']}, weights {q['weights']}, activations "
                  f"{q['activations']}, {q['calibration']} ranges from {q['calibration_images']} train images "
                  f"({q.get('calibration_inputs', 'the images')})."]
    lines += ["", "Fidelity against the PyTorch student (bounds fixed before measuring: "
              + ", ".join(f"{k} {v:g}" for k, v in ex["bounds"].items()) + "):", "",
              "| model | split | accuracy | drop vs PyTorch | argmax agreement | max abs logit diff |",
              "|---|---|---|---|---|---|"]
    for kind, per_split in ex["fidelity"].items():
        for split, m in per_split.items():
            drop = m.get("accuracy_drop", m.get("accuracy_pytorch", m["accuracy"]) - m["accuracy"])
            agree = m.get("agreement", m.get("agreement_with_fp32"))
            lines.append(f"| ONNX {kind} | {split} | {m['accuracy']:.2%} | {100 * drop:+.1f} pp | {agree:.2%} | "
                         f"{m['max_abs_logit_diff']:.1e} |")
    if ex.get("speed"):
        sp = ex["speed"]
        lines += ["", f"Speed and size on {sp['cpu']} ({sp['threads']} threads, {sp['kernels']} kernels), one run, "
                  "every model timed in the same process:", "",
                  "| model | runtime | input | latency batch 1, median (p90) | throughput batch 32 | parameters | file |",
                  "|---|---|---|---|---|---|---|"]
        for r in sp["rows"]:
            size = f"{r['file_bytes'] / 2**20:.1f} MiB" if r.get("file_bytes") else "–"
            lines.append(f"| {r['model']} | {r['runtime']} | {r['input_size'][0]}×{r['input_size'][1]} | "
                         f"{r['latency_ms_median']:.1f} ms ({r['latency_ms_p90']:.1f}) | {r['throughput_per_s']:.1f}/s | "
                         f"{r['parameters'] / 1e6:.2f} M | {size} |")
        lines += [f"- {k}: {sp[k]}" for k in ("bf16", "teacher") if k in sp]
    return lines


def _use_section(run: dict) -> list[str]:
    names = run.get("label_names") or run["dataset"].get("label_names") or []
    classes = ", ".join(" ".join(str(n).splitlines()) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    command = reproduce_command(run)
    use = [f'classify("image.png")  # an image like those of {" ".join(_dataset_name(run["dataset"]).splitlines())}: '
           f"scores for {classes}"]  # one line: a name's line break would start a line of code
    return ["", "## Reproduce", "", f"{_fence(command, 3)}bash", command, _fence(command, 3), "",
            "## Use", "", f"{_fence(use[0], 3)}python", "from transformers import pipeline", "",
            'classify = pipeline("image-classification", model="path/to/this/folder")  # or its Hub repo id',
            *use, _fence(use[0], 3), ""]


def _text(value) -> str:
    """`value` as Markdown text that renders as itself: names come from folders and flags a user (or a dataset's
    author) chose, and a class called `<img src=x onerror=...>` must not become HTML in the card. HTML's
    special characters become entities, Markdown's are backslash-escaped, line breaks become spaces."""
    text = html.escape(" ".join(str(value).splitlines()), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", text)


def _fence(text: str, least: int = 1) -> str:
    """A run of backticks longer than any in `text`, so that `text` cannot close the code span or block."""
    return "`" * max(least, 1 + max((len(run) for run in re.findall("`+", text)), default=0))


def _code(value) -> str:
    """`value` as an inline code span (shown verbatim, never rendered), on one line."""
    text = " ".join(str(value).splitlines())
    fence = _fence(text)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _teacher(run: dict) -> dict | None:
    return (run.get("cache") or {}).get("teacher")


def _on_hub(teacher: dict) -> bool:
    """A Hub id that was loaded from the Hub (a local folder records its weights' checksum instead)."""
    return looks_like_hub_id(teacher["spec"]) and not teacher.get("weights_sha256")


# datasets' packaged loaders: a local folder or file of one of these names says how it is stored, not what it holds
LOADER_NAMES = ("imagefolder", "parquet", "arrow", "csv", "json", "webdataset")


def _dataset_name(dataset: dict) -> str:
    """A Hub dataset's id; a local one's folder name (the folder holding it, for a file or a folder named after
    a loader, such as digits/imagefolder: `imagefolder` would read as the Hub's loader)."""
    spec = dataset["spec"].rstrip("/")
    if dataset.get("kind") == "hub":
        return spec
    path = PurePath(dataset.get("root") or spec)  # a file's root is its folder
    path = path.parent if path.suffix in (".parquet", ".arrow") else path
    path = path.parent if path.name.lower() in LOADER_NAMES else path
    return path.name or spec


def _labels(run: dict) -> str:
    names = run.get("label_names") or []
    return f"{len(names)} classes" if names else "image classes"
