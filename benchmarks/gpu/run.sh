#!/usr/bin/env bash
# One command for the lent GPU machine: the test suite on CUDA, then the benchmarks, results in $OUT.
# Sized to finish in about 8 minutes on an H100. Usage (device tool, from the repo root):
#   bash benchmarks/gpu/run.sh            # TOPICS="lowrank align nf4 qlora fourier step" by default
# Carried wheels (bitsandbytes is not in the GPU image): put them in .whl/ and name .whl in carry.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
TOPICS=${TOPICS:-"lowrank align nf4 qlora fourier step"}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. correctness on CUDA: the same tests CI runs under the interpreter
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels tests/test_layers.py tests/test_backends.py \
  tests/test_nf4.py tests/test_align.py tests/test_fourier.py tests/test_dual.py 2>&1 | tail -n 40 >"$OUT/tests.log"
tail -n 3 "$OUT/tests.log"

# 2. benchmarks, one pytest-benchmark JSON per topic
for t in $TOPICS; do
  f="benchmarks/bench_$t.py"
  [ -f "$f" ] || continue
  timeout 150 python3 -m pytest -q -p no:cacheprovider "$f" --benchmark-json="$OUT/bench_$t.json" \
    --benchmark-columns=median,min,rounds 2>&1 | tail -n 5
done
{
  python3 benchmarks/summarize.py "$OUT/bench_lowrank.json" --baseline base
  python3 benchmarks/summarize.py "$OUT/bench_step.json" --baseline paper
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
