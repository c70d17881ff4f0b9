set -u
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=$OUT/bench.jsonl
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,power.max_limit --format=csv > $OUT/gpu.txt
Q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$Q --format=csv,noheader >/dev/null 2>&1 || Q=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu
echo $Q > $OUT/smi_fields.txt
nvidia-smi --query-gpu=$Q --format=csv,noheader -lms 250 > $OUT/smi.csv 2>$OUT/smi_err.txt &
SMI=$!
mark() { echo "\"$1 at $SECONDS $(date +%H:%M:%S.%N)\"" >> $R; }
export PYTHONPATH=src:$SITE
BENCH="bench/train_step_bench.py --sizes 8b --modes packed --ckpt 0 --fused 1 --liger 1 --chunked 1 --budget 5632"
mark "sustained"
timeout 60 python3 bench/matmul_rate.py --seconds 30 >> $R 2>>$OUT/err.txt
mark "main"
timeout 80 python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
mark "main"
timeout 80 python3 $BENCH --steps 30 2>>$OUT/err.txt | grep '^{"size"' >> $R
mark "naive"
timeout 90 python3 bench/naive_lora_step.py --sizes 8b --modes padded 2>>$OUT/err.txt | grep '^{' >> $R
mark "sustained"
timeout 60 python3 bench/matmul_rate.py --seconds 30 >> $R 2>>$OUT/err.txt
mark "end"
kill $SMI
ls -R $OUT | head -30
