#!/usr/bin/env bash
# One GPU call of the end-to-end benchmark (bench/e2e_bench.py): the card's matmul rate, the data set, a
# random-weight checkpoint of SIZE, the training command vs the step bench, optionally the loader alone.
#   bash bench/e2e_gpu.sh SIZE BUDGET WORKERS STEPS TOKDIR [loader]
#   bash bench/e2e_gpu.sh 1b 20480 12 40 .bench_tokenizer loader
# Carried wheels (.whl/*.whl: transformers, peft, tokenizers, liger-kernel) are installed outside the system
# site-packages. Results in $OUT (or a new temporary folder).
set -eu
SIZE=$1 BUDGET=$2 WORKERS=$3 STEPS=$4 TOKDIR=$5 LOADER=${6:-}
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="src:$SITE" PYTHONUNBUFFERED=1
OUTDIR=${OUT:-$(mktemp -d)}
WORK=$(mktemp -d)
python3 bench/matmul_rate.py | tee "$OUTDIR/matmul_$SIZE.json"
python3 bench/e2e_bench.py --make-data "$WORK/data" --samples 600 --gen-workers "$(nproc)"
python3 bench/e2e_bench.py --make-model "$WORK/m" --size "$SIZE" --tokenizer "$TOKDIR"
python3 bench/e2e_bench.py --run --data "$WORK/data" --model "$WORK/m" --out "$WORK/o" --size "$SIZE" \
  --budget "$BUDGET" --steps "$STEPS" --workers "$WORKERS" | tee "$OUTDIR/${SIZE}_result.json"
cp "$WORK/o/run/metrics.jsonl" "$OUTDIR/${SIZE}_metrics.jsonl"
cp "$WORK/o/config.yaml" "$OUTDIR/${SIZE}_config.yaml"
cp "$WORK/o/train_log.txt" "$OUTDIR/${SIZE}_train_log.txt"
if [ -n "$LOADER" ]; then
  python3 bench/e2e_bench.py --loader-only --data "$WORK/data" --model "$WORK/m" --budget "$BUDGET" \
    --worker-counts 1,4,8 --loader-samples 160 | tee "$OUTDIR/loader.json"
fi
python3 bench/matmul_rate.py | tee -a "$OUTDIR/matmul_$SIZE.json"
