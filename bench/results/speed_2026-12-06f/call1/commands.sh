#!/usr/bin/env bash
set -u
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
R=$OUT/bench.jsonl
PYTHONPATH=.old/B/src:$SITE python3 bench/matmul_rate.py >> $R
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
echo '"B timeline-cpu"' >> $R
PYTHONPATH=.old/B/src:$SITE timeout 150 python3 $BENCH --steps 10 --timeline 2 --timeline-cpu --sync-debug --out /tmp/tl 2>$OUT/err_tl.txt | grep '^{"size"' >> $R
python3 bench/trace_gaps.py /tmp/tl/timeline.json.gz --top 30 > $OUT/gaps.txt 2>&1
cp /tmp/tl/kernels.txt $OUT/ 2>/dev/null
grep -B2 -A12 "synchroniz" $OUT/err_tl.txt | head -150 > $OUT/syncs.txt
for T in B G P B G P; do
  echo "\"$T\"" >> $R
  PYTHONPATH=.old/$T/src:$SITE timeout 110 python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
done
tail -c 1500 $OUT/err.txt
