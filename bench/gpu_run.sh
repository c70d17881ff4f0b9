#!/usr/bin/env bash
# One GPU call: install carried wheels, run the naive baseline and our training path, print ratios.
#   bash bench/gpu_run.sh "1b,8b" "packed" "1,2,0" "0,1"
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SIZES=${1:-1b,8b}; MODES=${2:-packed}; CKPT=${3:-1}; LIGER=${4:-0}; NAIVE=${5:-padded}
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
{
  [ "$NAIVE" != "none" ] && python3 bench/naive_lora_step.py --sizes "$SIZES" --modes "$NAIVE" | sed 's/^{/{"src":"naive",/'
  python3 bench/train_step_bench.py --sizes "$SIZES" --modes "$MODES" --ckpt "$CKPT" --liger "$LIGER" | sed 's/^{/{"src":"ours",/'
} | tee ${OUT:-/tmp}/bench.jsonl
python3 bench/ratios.py ${OUT:-/tmp}/bench.jsonl
