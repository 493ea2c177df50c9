#!/usr/bin/env bash
# What device_check_remote.sh needs on a GPU machine, in .devdata/ (git-ignored), within the device tool's
# 64 MiB for the working tree (the tracked files take ~28 MB): the Beans folder re-encoded at 224 x 224,
# JPEG quality 75 (16 MB; the 500 x 500 originals are 175 MB, so decoding there is ~5x cheaper per image
# than on the real files: stage_one.decode figures from it are upper bounds), the shared teacher (16 MB),
# and wheels of datasets, dill and multiprocess for Python 3.12 (the machine's image has the rest).
# Run it with the project's environment active (it needs Pillow and pip): . .venv/bin/activate first.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
command -v python >/dev/null || { echo "device_bundle.sh: no python on PATH; activate the project's environment (. .venv/bin/activate)" >&2; exit 1; }
grep -qx "/.devdata/" .git/info/exclude 2>/dev/null || echo "/.devdata/" >> .git/info/exclude
rm -rf .devdata && mkdir -p .devdata/whl
cp -r "$SHARED/teachers/beans-efficientnet-lite0" .devdata/teacher && chmod -R u+w .devdata/teacher
python - "$SHARED/beans" .devdata/beans <<'PY'
import sys
from pathlib import Path
from PIL import Image
src, dst = map(Path, sys.argv[1:])
for f in sorted(src.glob("*/*/*.jpg")):
    out = dst / f.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC).save(out, "JPEG", quality=75)
PY
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .devdata/whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .devdata/*
