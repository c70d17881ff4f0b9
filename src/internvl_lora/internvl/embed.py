"""The LLM's input embeddings of an InternVL batch whose image blocks reuse tiles.

A preference pair's two answers share the question's images: `embed_with_tiles` runs the vision tower
(and projector) once per tile and fills the k-th image block of the batch with the features of tile
`tile_index[k]`, so a tile used by both answers is encoded once, and the gradient of both uses flows
back to it. The model is then called with `inputs_embeds` (its own image path is not used).

`image_tokens_checked_on_the_gpu` keeps the model's own image path from stopping the host in training.
"""

from __future__ import annotations

import torch

from ..subclass import runtime_subclass


def internvl_model(model):
    """The transformers `InternVLForConditionalGeneration` inside DDP / DeepSpeed / PEFT wrappers."""
    inner = model
    for _ in range(8):  # PEFT forwards unknown attributes to the model it wraps: unwrap before asking
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):  # DDP, DeepSpeed engine
            inner = inner.module
        elif hasattr(inner, "get_image_features") and hasattr(getattr(inner, "config", None), "image_token_id"):
            return inner
        else:
            break
    raise TypeError(f"not an InternVL model: {type(model).__name__}")


def vision_is_trained(model) -> bool:
    """Whether the vision tower or the projector has trainable parameters (vision LoRA, projector)."""
    m = internvl_model(model).model
    return any(p.requires_grad for part in (m.vision_tower, m.multi_modal_projector) for p in part.parameters())


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(tiles, tokens per tile, hidden): the projected features of each tile, as the model's forward makes them."""
    m = internvl_model(model)
    cfg = m.config
    out = m.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                               vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def embed_with_tiles(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, tile_index: torch.Tensor | None,
                     dummy_vision: bool = False, features: torch.Tensor | None = None):
    """(inputs_embeds, tile features): the token embeddings with image block k filled from tile
    `tile_index[k]`. `features` given: use these tile features instead of running the vision tower.
    Without tiles and with `dummy_vision`, a blank tile runs through the vision tower and adds zero, so
    every process runs the same modules (ZeRO / FSDP collectives) and a trained vision part gets a gradient."""
    m = internvl_model(model)
    embeds = m.get_input_embeddings()(input_ids)
    if features is None and pixel_values is not None:
        features = image_features(model, pixel_values)
    if features is not None and tile_index is not None and tile_index.numel():
        picked = features[tile_index.to(features.device)].reshape(-1, features.shape[-1]).to(embeds.dtype)
        mask = (input_ids == m.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask.expand_as(embeds), picked)
    elif pixel_values is None and dummy_vision:
        size = m.config.vision_config.image_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        blank = torch.zeros(1, 3, size, size, device=embeds.device, dtype=embeds.dtype)
        embeds = embeds + image_features(model, blank).sum() * 0.0
    return embeds, features


def image_tokens_checked_on_the_gpu(model) -> bool:
    """Training: the InternVL model checks that a batch's image tokens match its image features on the GPU
    (`torch._assert_async`) instead of reading the token count back to the host. transformers' check
    (`get_placeholder_mask`) does the latter: every forward, the host waited there for the vision tower
    to finish before it could queue the language model, the GPU idle meanwhile. A mismatch still stops
    the step (a device-side assert on a GPU, the message on a CPU); our collators make the counts match
    by construction. Same module otherwise (name, state dict; pickles). Returns whether it applies."""
    inner = internvl_model(model).model
    if not hasattr(inner, "get_placeholder_mask"):
        return False
    if not getattr(inner, "_image_tokens_checked_on_the_gpu", False):
        inner.__class__ = _checked_on_the_gpu(type(inner))
    return True


@runtime_subclass
def _checked_on_the_gpu(cls):
    class CheckedOnTheGpu(cls):
        _image_tokens_checked_on_the_gpu = True

        def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
            if input_ids is None:  # image tokens found by their embedding: the library's own way
                return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                                    image_features=image_features)
            mask = input_ids == self.config.image_token_id
            torch._assert_async(mask.sum() * inputs_embeds.shape[-1] == image_features.numel(),
                                "image tokens and image features do not match")
            return mask.unsqueeze(-1).to(inputs_embeds.device)

    return CheckedOnTheGpu
