# call 2 (the machine of call 1, still warm): C, B, then the naive stack
set -u
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=$OUT/bench.jsonl
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
step() {
  PYTHONPATH=.old/B/src:$SITE timeout 20 python3 bench/matmul_rate.py >> $R
  echo "\"$1 at $SECONDS\"" >> $R
  PYTHONPATH=.old/$1/src:$SITE timeout 80 python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
}
step C; step B
echo '"naive"' >> $R; PYTHONPATH=.old/B/src:$SITE timeout 100 python3 bench/naive_lora_step.py --sizes 8b --modes padded 2>>$OUT/err.txt | grep '^{' >> $R
PYTHONPATH=.old/B/src:$SITE timeout 20 python3 bench/matmul_rate.py >> $R
echo "\"end at $SECONDS\"" >> $R
