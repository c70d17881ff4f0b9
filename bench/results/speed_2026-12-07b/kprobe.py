"""The LoRA dropout kernels alone (public calls, as the fused layer makes them), at the 8B step's micro-batch:
ms per call at the narrow (3584) and wide (18944, the down projection: A's gradient forms silu(gate) * up)
input widths, and the sum per decoder layer (6 narrow + 1 wide projections). Tree from PYTHONPATH; rounds
from ROUNDS when the tree has PHILOX_ROUNDS."""
import json, os
import torch
from internvl_lora.lora import kernels

if hasattr(kernels, "PHILOX_ROUNDS") and os.environ.get("ROUNDS"):
    kernels.PHILOX_ROUNDS = int(os.environ["ROUNDS"])
T, R, P = 5632, 16, 0.05
bf = torch.bfloat16


def timed(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


torch.manual_seed(0)
row = {"tree": os.environ.get("TREE"), "rounds": getattr(kernels, "PHILOX_ROUNDS", 10)}
total = 0.0
for k, n in ((3584, 6), (18944, 1)):
    x = torch.randn(T, k, device="cuda", dtype=bf)
    up = torch.randn(T, k, device="cuda", dtype=bf) if k > 8192 else None
    a = (torch.randn(R, k, device="cuda") / 10).to(bf)
    gh = torch.randn(T, R, device="cuda", dtype=bf)
    f = timed(lambda: kernels.lora_a_forward(x, a, 123, P, 2.0).to(bf))
    ga = timed(lambda: kernels.lora_a_grad(gh, x, 123, P, up=up))
    gx = timed(lambda: kernels.lora_input_grad(gh, a, 123, P))
    row[f"k{k}"] = {"fwd_ms": round(f, 4), "grad_a_ms": round(ga, 4), "grad_x_ms": round(gx, 4)}
    total += n * (f + ga + gx)
row["layer_ms"] = round(total, 3)
row["step_ms_28_layers"] = round(28 * total, 1)
print(json.dumps(row))
