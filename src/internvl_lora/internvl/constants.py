"""Special tokens and fixed strings of the official InternVL recipe (internvl_chat/internvl/train/constants.py)."""

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
QUAD_START_TOKEN, QUAD_END_TOKEN = "<quad>", "</quad>"
REF_START_TOKEN, REF_END_TOKEN = "<ref>", "</ref>"
BOX_START_TOKEN, BOX_END_TOKEN = "<box>", "</box>"

# The nine strings the official finetune script adds to the tokenizer (a no-op for released checkpoints).
SPECIAL_TOKENS = [
    IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN,
    QUAD_START_TOKEN, QUAD_END_TOKEN, REF_START_TOKEN, REF_END_TOKEN, BOX_START_TOKEN, BOX_END_TOKEN,
]

# Placeholders in the data.
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

IGNORE_INDEX = -100

# Normalization constants by `normalize_type`.
NORMALIZE = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
