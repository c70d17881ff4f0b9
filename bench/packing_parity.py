"""Correctness guard on the GPU: packed (varlen) and padded batches give the same loss in bf16.

    python bench/packing_parity.py

Same samples, same weights (an InternVL3-1B-shaped model cut to 4 LLM layers and a 2-layer ViT,
random weights), bf16: the padded stock path (SDPA + padding mask, stock loss) against our packed path
(one row, varlen attention, loss on trained positions). Prints both losses and their difference.
"""

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step_bench import IMG_TOKEN, LLM, Synthetic, samples  # noqa: E402
from transformers import InternVLConfig, InternVLForConditionalGeneration  # noqa: E402

from internvl_lora.data.collate import PackedCollator, PadCollator  # noqa: E402
from internvl_lora.train.loss import trained_positions_loss  # noqa: E402
from internvl_lora.train.speed import register_varlen_attention  # noqa: E402

torch.manual_seed(0)
text = dict(LLM["1b"], num_hidden_layers=4)
cfg = InternVLConfig(vision_config=dict(num_hidden_layers=2), text_config=dict(model_type="qwen2", rope_theta=1e6, max_position_embeddings=32768, **text),
                     image_token_id=IMG_TOKEN, tie_word_embeddings=True)
with torch.device("cuda"):
    model = InternVLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
items = [Synthetic([samples(8, random.Random(1), 6)], 448)[i] for i in range(8)]
for it in items:
    it["pixel_values"] = it["pixel_values"].to(torch.bfloat16)
to = lambda b: {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
with torch.no_grad():
    padded = to(PadCollator(0)(items))
    stock = model(**padded, use_cache=False).loss.float().item()
    n = (padded["labels"][:, 1:] != -100).sum()
    model.set_attn_implementation({"text_config": register_varlen_attention()})
    packed = trained_positions_loss(model, to(PackedCollator()(items)), n).float().item()
print(json.dumps({"padded_stock_loss": stock, "packed_varlen_loss": packed, "abs_diff": abs(stock - packed),
                  "rel_diff": abs(stock - packed) / abs(stock)}))
