"""Chat with a checkpoint: a merged model of either format, a base model, or an adapter folder.

    internvl-lora chat MODEL --image a.jpg "What is in the picture?"
    internvl-lora chat MODEL --image a.jpg --image b.jpg "Image-1: <image>\\nImage-2: <image>\\nCompare them."
    internvl-lora chat MODEL --video v.mp4 "What happens?"
    internvl-lora chat MODEL --image a.jpg          # interactive: one question per line on stdin

Greedy decoding by default, stopping at the template's stop token. Tiling settings come from the
adapter / merged folder (`internvl_lora.json`) so inference matches training. Only the answer goes to
stdout; loading messages, warnings and progress bars go to stderr.

In a session (interactive mode, `ChatSession`) the images stay attached to the first question, as the
official `model.chat` keeps them: every turn is asked with the whole history, the first question's
`<image>` placeholders and the same pixels. Loading, input building and generation live in `infer`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Iterable

import torch

from .data.encode import frame_tile, normalize
from .errors import UserError
from .infer import (
    Loaded, encode_prompt, generate, image_tiles, load_for_inference, load_frames, place_placeholders,
)


class ChatSession:
    """A conversation about fixed images or a video: each `ask` sees the whole history."""

    def __init__(self, loaded: Loaded, images: list[str] | None = None, video: str | None = None,
                 max_new_tokens: int = 256, system: str | None = None, num_frames: int | None = None):
        if images and video:
            raise UserError("give images or a video, not both")
        self.loaded, self.max_new_tokens, self.system = loaded, max_new_tokens, system
        self.images = list(images or [])
        self.frames = load_frames(video, loaded.settings, num_frames=num_frames) if video else None
        s = loaded.settings
        if self.frames is not None:
            tiles, self.counts = [frame_tile(f, s.tile_size, s.fast_resize) for f in self.frames], [1] * len(self.frames)
        else:
            tiles, self.counts = image_tiles(self.images, s) if self.images else ([], [])
        self.pixels = normalize(tiles, s.normalize_type) if tiles else None
        self.history: list[tuple[str, str]] = []

    def ask(self, question: str) -> str:
        s = self.loaded.settings
        n_frames = len(self.frames) if self.frames is not None else None
        question, history = place_placeholders(question, self.history, len(self.images), n_frames)
        ids = encode_prompt(question, history, self.counts, s, self.loaded.tokenizer, self.system)
        answer = generate(self.loaded, [(ids, self.pixels)], self.max_new_tokens)[0]
        self.history = history + [(question, answer)]
        return answer


def chat_once(loaded: Loaded, question: str, images: list[str] | None = None, video: str | None = None,
              max_new_tokens: int = 256, history=None) -> str:
    session = ChatSession(loaded, images, video, max_new_tokens)
    session.history = list(history or [])
    return session.ask(question)


def interactive(loaded: Loaded, images: list[str] | None = None, video: str | None = None,
                max_new_tokens: int = 256, lines: Iterable[str] | None = None, out: IO[str] | None = None) -> int:
    """One question per input line, one answer line per question (newlines in an answer are kept as
    `\\n` so that each answer is one line). Stops at an empty line or end of input; returns the turns."""
    lines = sys.stdin if lines is None else lines
    out = sys.stdout if out is None else out
    session = ChatSession(loaded, images, video, max_new_tokens)
    if getattr(lines, "isatty", lambda: False)():
        print("interactive chat: one question per line, empty line or Ctrl-D to quit", file=sys.stderr)
    for line in lines:
        q = line.rstrip("\n")
        if not q.strip():
            break
        answer = session.ask(q.replace("\\n", "\n"))
        print(answer.replace("\n", "\\n"), file=out, flush=True)
    return len(session.history)


def check_chat_args(images: list[str] | None, video: str | None, max_new_tokens: int) -> None:
    """The arguments a user can get wrong, checked before the (slow) model load."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if images and video:
        raise UserError("give images or a video, not both")
    for p in images or []:
        if not Path(p).exists():
            raise UserError(f"{p}: image file not found")
        if Path(p).is_dir():
            raise UserError(f"{p} is a folder, not an image file")
    if video and not Path(video).exists():
        raise UserError(f"{video}: video not found")


def run_chat(model: str, question: str | None = None, images: list[str] | None = None, video: str | None = None,
             max_new_tokens: int = 256, dtype: str | torch.dtype | None = None, base: str | None = None,
             device: str | None = None) -> None:
    """The `chat` command: load, then answer the question, or every stdin line when there is none.
    Only answers are written to stdout."""
    check_chat_args(images, video, max_new_tokens)
    loaded = load_for_inference(model, dtype=dtype, base=base, device=device)
    if question is not None:
        print(chat_once(loaded, question.replace("\\n", "\n"), images, video, max_new_tokens), flush=True)
        return
    interactive(loaded, images, video, max_new_tokens)
