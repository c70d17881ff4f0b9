"""A tiny transformers-native InternVL and a matching tokenizer, built locally and deterministically.

Used by the demo and the tests: no download, a few hundred thousand parameters, shaped like a real
checkpoint folder (config.json, model.safetensors, tokenizer files, preprocessor_config.json,
generation_config.json). The weights are random (seeded): the demo then shows that what the tuned
model knows came from LoRA training, and the base answers at or below chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .constants import SPECIAL_TOKENS
from .templates import TEMPLATES

# Tokens every InternVL tokenizer has, in the order of the Qwen-based releases.
TOKENIZER_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *SPECIAL_TOKENS]

TILE_SIZE = 64
PATCH_SIZE = 8
# Random weights at the scale of trained ones (unit gain per layer for hidden 128), not the default
# 0.02, under which a frozen random network passes too little signal for LoRA to learn from.
INIT_STD = 0.08


def build_tokenizer(extra_corpus: list[str] | None = None, vocab_size: int = 1024):
    """A byte-level BPE tokenizer holding the InternVL special tokens; any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for t in TEMPLATES.values():
        corpus += [t.system_message, t.user, t.assistant, t.sep, t.system_template]
    corpus += extra_corpus or []
    corpus = sorted(set(corpus)) * 4  # a fixed order: BPE training is then deterministic
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=TOKENIZER_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=4096,
    )
    return fast


def build_config(vocab_size: int, image_token_id: int, eos_token_id: int, pad_token_id: int):
    from transformers import InternVLConfig, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        image_size=TILE_SIZE, patch_size=PATCH_SIZE, attention_bias=True, layer_scale_init_value=1.0,
        initializer_range=INIT_STD,
    )
    text = Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
        initializer_range=INIT_STD,
    )
    tokens_per_tile = (TILE_SIZE // PATCH_SIZE) ** 2 // 4
    return InternVLConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
        image_seq_length=tokens_per_tile, downsample_ratio=0.5, tie_word_embeddings=False,
    )


def build_tiny_checkpoint(out_dir: str | Path, extra_corpus: list[str] | None = None, seed: int = 0,
                          max_dynamic_patch: int = 6) -> Path:
    """Write a tiny -hf style InternVL checkpoint folder and return its path."""
    from transformers import GenerationConfig, InternVLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(extra_corpus)
    vocab = len(tokenizer)
    vocab_padded = (vocab + 63) // 64 * 64
    config = build_config(
        vocab_padded,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    # A pretrained LM head has rows of norm ~1 or more; the default init (std 0.02) gives logits so
    # flat that a frozen head cannot express a confident answer however the adapters move the hidden
    # state. Rescale it so that LoRA on the decoder layers (the official recipe) can learn the task.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.1)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The -hf processor settings InternVL releases carry (448 px tiles there, TILE_SIZE here).
    from .format.config_map import preprocessor_config

    settings = preprocessor_config({"force_image_size": TILE_SIZE, "max_dynamic_patch": max_dynamic_patch,
                                    "min_dynamic_patch": 1, "dynamic_image_size": True})
    (out / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return out
