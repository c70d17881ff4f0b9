set -u
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=$OUT/bench.jsonl
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
PYTHONPATH=.old/D/src:$SITE timeout 90 python3 -m pytest -q -m gpu .old/D/tests/lora/ > $OUT/gpu_tests.txt 2>&1
for X in B D B D; do TREE=$X PYTHONPATH=.old/$X/src:$SITE timeout 60 python3 .old/kprobe.py >> $R 2>>$OUT/err.txt; done
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
step() {
  PYTHONPATH=.old/B/src:$SITE timeout 20 python3 bench/matmul_rate.py >> $R
  echo "\"$1 at $SECONDS\"" >> $R
  PYTHONPATH=.old/$1/src:$SITE timeout 80 python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
}
step D; step B
echo "\"end at $SECONDS\"" >> $R
