#!/usr/bin/env bash
# One GPU call: the naive baseline, then our path once per option string (passed to train_step_bench.py),
# then the ratios. Results in $OUT/bench.jsonl (without $OUT: a new temporary folder, named on stderr).
#   bash bench/gpu_perf.sh 8b "--ckpt 1 --fused 0,1" "--ckpt 0 --fused 1 --liger 1 --budget 3840"
set -u
SITE=$(mktemp -d)  # the carried wheels (.whl/) are installed here, outside the system site-packages
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl && export PYTHONPATH="$SITE"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SIZES=$1; shift
OUTDIR=${OUT:-$(mktemp -d)}
OUTF=$OUTDIR/bench.jsonl
echo "results: $OUTF" >&2
python3 bench/naive_lora_step.py --sizes "$SIZES" --modes padded | sed 's/^{/{"src":"naive",/' | tee -a "$OUTF"
for cfg in "$@"; do
  # each argument is one option string, e.g. "--ckpt 1 --fused 0,1"
  python3 bench/train_step_bench.py --sizes "$SIZES" --modes packed $cfg 2>>"$OUTDIR/stderr.txt" | grep '^{"size"' | sed 's/^{/{"src":"ours",/' | tee -a "$OUTF"
done
python3 bench/ratios.py "$OUTF"
