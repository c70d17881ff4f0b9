#!/usr/bin/env bash
set -u
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=".old/B/src:$SITE"; T=".old/T/src:$SITE"
R=$OUT/bench.jsonl
PYTHONPATH=$B python3 bench/matmul_rate.py >> $R
for X in B T; do echo "\"first use $X\"" >> $R; P=.old/$X/src:$SITE; PYTHONPATH=$P python3 .old/first_use.py >> $R 2>>$OUT/err.txt; done
echo '"loss head B"' >> $R
PYTHONPATH=$B python3 .old/loss_head_bench_B.py --positions 221,884,1500 >> $R 2>>$OUT/err.txt
echo '"loss head T"' >> $R
PYTHONPATH=$T python3 bench/loss_head_bench.py --positions 221,884,1500 >> $R 2>>$OUT/err.txt
PYTHONPATH=$T python3 -m pytest -q -m gpu tests/train/test_loss.py > $OUT/gpu_tests.txt 2>&1
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
echo '"T timeline"' >> $R
PYTHONPATH=$T timeout 120 python3 $BENCH --steps 10 --timeline 4 --out /tmp/tl 2>>$OUT/err.txt | grep '^{"size"' >> $R
python3 bench/trace_gaps.py /tmp/tl/timeline.json.gz --top 12 > $OUT/gaps.txt 2>&1
for X in B T B T; do
  echo "\"$X\"" >> $R
  PYTHONPATH=.old/$X/src:$SITE timeout 120 python3 $BENCH --steps 60 2>>$OUT/err.txt | grep '^{"size"' >> $R
done
tail -c 800 $OUT/err.txt
