"""Host overhead of the LLM decoder layers: eager vs CUDA graphs (torch.cuda.make_graphed_callables).

    python bench/graph_probe.py --size 8b --layers 4 --tokens 3840

Decoder layers of the InternVL3 LLM shape (random weights, Liger kernels, LoRA r16 with dropout on
all projections through our fused layer, packed varlen attention), one packed row of --tokens tokens
in --segments samples; forward + backward of the layers only, timed per iteration after warm-up.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_lora_step import LLM  # noqa: E402

from internvl_lora.lora.fused import fuse_lora_layers  # noqa: E402
from internvl_lora.train.speed import apply_liger, register_varlen_attention  # noqa: E402


class Call(torch.nn.Module):
    def __init__(self, layer, tokens):
        super().__init__()
        self.layer, self.tokens = layer, tokens

    def forward(self, h, cos, sin, cu, pos):
        return self.layer(h, position_embeddings=(cos, sin), position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                          max_length_q=self.tokens, max_length_k=self.tokens)


def build(size, layers, dropout):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = {k: v for k, v in LLM[size].items() if k != "tie_word_embeddings"}
    shape.update(num_hidden_layers=layers, vocab_size=1024)
    cfg = Qwen2Config(**shape, rope_theta=1e6, max_position_embeddings=32768, use_cache=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.set_attn_implementation(register_varlen_attention())
    apply_liger(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                             target_modules=r".*\.(q|k|v|o|gate|up|down)_proj"))
    fuse_lora_layers(model)
    model.train()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=3840)
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dropout", type=float, default=0.05)
    a = ap.parse_args()
    model = build(a.size, a.layers, a.dropout)
    inner = model.get_base_model().model
    T = a.tokens
    bounds = torch.linspace(0, T, a.segments + 1).long()
    cu = bounds.to(torch.int32).cuda()
    pos = torch.cat([torch.arange(int(b - s)) for s, b in zip(bounds[:-1], bounds[1:])])[None].cuda()
    h0 = torch.randn(1, T, inner.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    cos, sin = inner.rotary_emb(h0, pos)
    calls = [Call(layer, T) for layer in inner.layers]
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}

    def run(fns, n):
        for _ in range(n):
            h = h0.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                for f in fns:
                    h = f(h, cos, sin, cu, pos)
            h.float().square().mean().backward()

    for name in ("eager", "graphed"):
        fns = calls
        if name == "graphed":
            samples = tuple((h0.clone().requires_grad_(True), cos, sin, cu, pos) for _ in calls)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                fns = torch.cuda.make_graphed_callables(tuple(calls), samples)
        run(fns, 3)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        run(fns, a.iters)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / a.iters
        out[name] = dict(ms_per_iter=round(dt * 1e3, 1), ms_per_layer=round(dt * 1e3 / a.layers, 2),
                         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                         grad_norm=float(torch.stack([p.grad.float().norm() for p in params]).norm()))
        for p in params:
            p.grad = None
    print(json.dumps(dict(size=a.size, layers=a.layers, tokens=T, dropout=a.dropout, **out,
                          speedup=round(out["eager"]["ms_per_iter"] / out["graphed"]["ms_per_iter"], 2))))


if __name__ == "__main__":
    main()
