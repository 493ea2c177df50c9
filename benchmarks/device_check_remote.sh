#!/usr/bin/env bash
# device_check.py on a lent GPU machine that has PyTorch but not kdpipe's other packages and no network.
# Here, first: bash benchmarks/device_bundle.sh (fills .devdata/, which git ignores). Then, through the
# device tool, from the repository root, carrying .devdata:
#     BUDGET=360 bash benchmarks/device_check_remote.sh        # EXTRA="--only ..." passes more flags
# It installs the carried wheels (datasets and its two missing needs) into /tmp/site, makes kdpipe importable
# from pipeline/, prints the versions, and writes the check's JSON and log to $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devdata/whl/*.whl || exit 1
ln -sfn "$PWD/pipeline" /tmp/site/kdpipe
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, pyarrow, datasets, kdpipe; print(sys.version.split()[0], torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'datasets', datasets.__version__)"
echo "$(nproc) CPU cores; $(lscpu | grep 'Model name' | tr -s ' ')"
python3 benchmarks/device_check.py --device cuda --dataset .devdata/beans --teacher .devdata/teacher \
  --budget-s "${BUDGET:-360}" --json "${OUT:-.}/device_check_cuda.json" ${EXTRA} 2>&1 | tee "${OUT:-.}/device_check_cuda.log"
