#!/usr/bin/env bash
set -u
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B="src:$SITE"; A=".old/A/src:$SITE"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
R=$OUT/bench.jsonl
PYTHONPATH=$B python3 bench/matmul_rate.py >> $R
PYTHONPATH=$B python3 bench/naive_lora_step.py --sizes 8b --modes padded 2>>$OUT/err.txt | grep '^{' >> $R
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
echo '"main"' >> $R
PYTHONPATH=$B python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
echo '"loss head B"' >> $R
PYTHONPATH=$B python3 bench/loss_head_bench.py 2>>$OUT/err.txt >> $R
echo '"loss head A"' >> $R
PYTHONPATH=$A python3 bench/loss_head_bench.py 2>>$OUT/err.txt >> $R
echo '"main profile"' >> $R
PYTHONPATH=$B python3 $BENCH --steps 8 --profile --out /tmp/prof 2>>$OUT/err.txt > /tmp/prof.log
grep '^{"size"' /tmp/prof.log >> $R
T=$(find /tmp/prof -name 'trace*.json*' | head -1); echo "trace $T" >> $OUT/gaps.txt
python3 bench/trace_gaps.py "$T" --kernel Memcpy >> $OUT/gaps.txt 2>&1
python3 bench/trace_gaps.py "$T" --kernel flash_fwd --top 40 | grep '^\[' >> $OUT/gaps.txt 2>&1
echo '"main again"' >> $R
PYTHONPATH=$B python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
PYTHONPATH=$B python3 bench/matmul_rate.py >> $R
tail -c 3000 $OUT/err.txt
