"""Ratios of our training path against the naive baseline from one bench.jsonl (same GPU call)."""
import json
import sys

rows = [json.loads(x) for x in open(sys.argv[1]) if x.startswith("{")]
naive = {r["size"]: r for r in rows if r.get("src") == "naive" and "error" not in r and r.get("mode") == "padded"}
for r in rows:
    if r.get("src") != "ours" or "error" in r:
        continue
    n = naive.get(r["size"])
    if not n:
        continue
    print(f"{r['size']:>4} {r['mode']:<12} ckpt={r['grad_ckpt']} liger={int(r['liger'])} fused={int(r.get('fused_lora', 0))} "
          f"compile={int(r.get('compile', 0))} chunked={int(r.get('chunked_loss', 0))} accum={r.get('grad_accum', 1)} budget={r.get('token_budget', 0)} dropout={r.get('lora_dropout')}: "
          f"{r['real_tokens_per_s']:>7} tok/s = {r['real_tokens_per_s'] / n['real_tokens_per_s']:.2f}x naive "
          f"({n['real_tokens_per_s']}), {r['model_tflops']} TFLOP/s ({r.get('pct_of_matmul', '?')} % of the "
          f"matmul rate {r.get('matmul_tflops', '?')} measured in the same process), "
          f"peak {r['peak_gib']} GiB vs naive {n['peak_gib']} GiB")
