#!/usr/bin/env bash
set -u
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=".old/B/src:$SITE"; C="src:$SITE"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
R=$OUT/bench.jsonl
PYTHONPATH=$B python3 bench/matmul_rate.py >> $R
PYTHONPATH=$B python3 bench/host_launch_probe.py >> $R 2>>$OUT/err.txt
PYTHONPATH=$B python3 bench/host_launch_probe.py --out 4096 >> $R 2>>$OUT/err.txt
echo '"loss head B"' >> $R
PYTHONPATH=$B python3 bench/loss_head_bench.py --positions 221,884,1500 >> $R 2>>$OUT/err.txt
echo '"loss head C"' >> $R
PYTHONPATH=$C python3 bench/loss_head_bench.py --positions 221,884,1500 >> $R 2>>$OUT/err.txt
PYTHONPATH=$C python3 -m pytest -q -m gpu tests/train/test_loss.py > $OUT/gpu_tests.txt 2>&1
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
echo '"B timeline"' >> $R
PYTHONPATH=$B python3 $BENCH --steps 10 --timeline 2 --out /tmp/tl 2>>$OUT/err.txt | grep '^{"size"' >> $R
python3 bench/trace_gaps.py /tmp/tl/timeline.json.gz --top 30 > $OUT/gaps.txt 2>&1
cp /tmp/tl/kernels.txt $OUT/ 2>/dev/null
for T in C B; do
  echo "\"$T\"" >> $R
  if [ $T = B ]; then P=$B; else P=$C; fi
  PYTHONPATH=$P timeout 100 python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
done
tail -c 1500 $OUT/err.txt
