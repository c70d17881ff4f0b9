#!/usr/bin/env bash
# LIMIT: seconds this call may use; later parts run only while time is left
set -u
L=${LIMIT:-540}
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=$OUT/bench.jsonl
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)" >> $OUT/gpu.txt
PYTHONPATH=.old/B/src:$SITE timeout 20 python3 bench/matmul_rate.py >> $R
for i in 1 2; do
  TREE=B PYTHONPATH=.old/B/src:$SITE timeout 60 python3 .old/kprobe.py >> $R 2>>$OUT/err.txt
  for n in 10 7; do TREE=C ROUNDS=$n PYTHONPATH=.old/C/src:$SITE timeout 60 python3 .old/kprobe.py >> $R 2>>$OUT/err.txt; done
done
echo "\"kprobe end at $SECONDS\"" >> $R
PYTHONPATH=.old/C/src:$SITE timeout 90 python3 -m pytest -q -m gpu .old/C/tests/lora/test_kernels.py .old/C/tests/lora/test_fused.py > $OUT/gpu_tests.txt 2>&1
echo "\"tests end at $SECONDS\"" >> $R
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
step() {
  PYTHONPATH=.old/B/src:$SITE timeout 20 python3 bench/matmul_rate.py >> $R
  echo "\"$1 at $SECONDS\"" >> $R
  PYTHONPATH=.old/$1/src:$SITE timeout 80 python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
}
step B; step C
[ $SECONDS -lt $((L - 140)) ] && step C
[ $SECONDS -lt $((L - 70)) ] && step B
[ $SECONDS -lt $((L - 100)) ] && echo '"naive"' >> $R && PYTHONPATH=.old/B/src:$SITE timeout 90 python3 bench/naive_lora_step.py --sizes 8b --modes padded 2>>$OUT/err.txt | grep '^{' >> $R
PYTHONPATH=.old/B/src:$SITE timeout 20 python3 bench/matmul_rate.py >> $R
echo "\"end at $SECONDS\"" >> $R
tail -c 1500 $OUT/err.txt
