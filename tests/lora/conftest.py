"""Fixtures of the LoRA tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def cuda_lora_inputs():
    """(x, base, bias, a, b, g) of a LoRA layer on the GPU, seeded (0): bf16 input (3, 1000, 512), weight
    (256, 512) and bias, float32 LoRA factors of rank 16, bf16 output gradient."""
    import torch

    torch.manual_seed(0)
    bf = torch.bfloat16
    x = torch.randn(3, 1000, 512, device="cuda", dtype=bf, requires_grad=True)
    base = torch.randn(256, 512, device="cuda", dtype=bf) / 20
    bias = torch.randn(256, device="cuda", dtype=bf)
    a = torch.randn(16, 512, device="cuda", dtype=torch.float32, requires_grad=True)
    b = torch.randn(256, 16, device="cuda", dtype=torch.float32, requires_grad=True)
    g = torch.randn(3, 1000, 256, device="cuda", dtype=bf)
    return x, base, bias, a, b, g
