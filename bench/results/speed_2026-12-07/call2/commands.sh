# call 2 (same warm machine as call 1): the 8B step on Q then B, the matmul rate before, between and after
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=$OUT/bench.jsonl
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
for X in Q B; do PYTHONPATH=.old/B/src:$SITE timeout 20 python3 bench/matmul_rate.py >> $R; echo "\"$X at $SECONDS\"" >> $R; PYTHONPATH=.old/$X/src:$SITE timeout 70 python3 $BENCH --steps 30 2>/dev/null | grep '^{"size"' >> $R; done
PYTHONPATH=.old/B/src:$SITE timeout 20 python3 bench/matmul_rate.py >> $R
