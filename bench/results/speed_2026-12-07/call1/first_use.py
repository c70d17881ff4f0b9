"""Host time of the chunked loss at new vs seen counts of positions (either tree)."""
import json, sys, time
import torch
from internvl_lora.train.loss import _ChunkedLinearCrossEntropy
dev, dtype = "cuda", torch.bfloat16
w = (torch.randn(151674, 4096, device=dev) * 0.02).to(dtype)
h = torch.randn(221, 4096, device=dev).to(dtype); t = torch.randint(0, 151674, (221,), device=dev)
for _ in range(3):
    _ChunkedLinearCrossEntropy.apply(h, w, t, None)
fresh = list(range(int(sys.argv[1]) if len(sys.argv) > 1 else 97, 221, 7))
res = {}
for name in ("first", "again"):
    out = []
    for m in fresh:
        h = torch.randn(m, 4096, device=dev).to(dtype); t = torch.randint(0, 151674, (m,), device=dev)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        _ChunkedLinearCrossEntropy.apply(h, w, t, None)
        out.append(round((time.perf_counter() - t0) * 1e3, 2))
        torch.cuda.synchronize()
    res[name] = out
print(json.dumps(dict(fresh=fresh, **res)))
