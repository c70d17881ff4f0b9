"""internvl-lora: LoRA fine-tuning of InternVL vision-language models on your own multimodal data."""

__version__ = "0.1.0"
