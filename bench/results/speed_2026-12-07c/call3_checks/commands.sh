set -u
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=src:$SITE
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
S=$SECONDS; D=$(mktemp -d)
timeout 110 python3 -m internvl_lora.cli demo --out $D/demo_out > $OUT/demo_log.txt 2>&1; echo "rc $? in $((SECONDS-S)) s" >> $OUT/demo_log.txt
cp $D/demo_out/summary.json $OUT/ 2>/dev/null
S=$SECONDS
timeout 200 python3 -m pytest -v -m gpu -p no:cacheprovider -rfEs 2>&1 | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|Error" | tail -60 > $OUT/gpu_tests.txt
echo "gpu tests: $((SECONDS-S)) s" >> $OUT/gpu_tests.txt
tail -3 $OUT/demo_log.txt; tail -4 $OUT/gpu_tests.txt
