"""Everything that is specific to InternVL: tokens, templates, tiling, LoRA targets, checkpoint formats.

Generic code (training loop, merge check, metrics) does not import model-family details from anywhere else.
"""
