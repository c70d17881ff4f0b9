"""Everything LoRA: which parts train and how the adapters are injected, and the fused training path.

- `policy`: trainability per part (vision, projector, LLM), PEFT injection, the trainable-parameter table.
- `fused`: fused LoRA layers and the fused SwiGLU MLP (one autograd node each, keeping less for the backward).
- `kernels`: launch wrappers of the Triton kernels for the LoRA dropout path and the SwiGLU (GPU).
- `_triton`: the Triton source of those kernels (imported only when they run: it needs triton).

Nothing is imported here: PEFT, transformers and triton load only when a module that needs them is used.
"""
