"""Which process this is under torchrun (read from its environment variables), and printing from rank 0."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def print0(*args) -> None:
    if is_main():
        print(*args, flush=True)
