#!/usr/bin/env bash
set -u
L=${LIMIT:-200}
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=$OUT/bench.jsonl
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
for X in B Q; do echo "\"first use $X\"" >> $R; PYTHONPATH=.old/$X/src:$SITE timeout 50 python3 .old/first_use.py >> $R 2>>$OUT/err.txt; done
PYTHONPATH=.old/Q/src:$SITE timeout 50 python3 -m pytest -q -m gpu .old/Q/tests/train/test_loss.py > $OUT/gpu_tests.txt 2>&1
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
step() {
  PYTHONPATH=.old/B/src:$SITE timeout 20 python3 bench/matmul_rate.py >> $R
  echo "\"$1 at $SECONDS\"" >> $R
  PYTHONPATH=.old/$1/src:$SITE timeout 70 python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
}
[ $SECONDS -lt $((L - 150)) ] && step B && step Q
echo "\"end at $SECONDS\"" >> $R
tail -c 1500 $OUT/err.txt
