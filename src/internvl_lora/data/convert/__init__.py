"""Convert and clean annotation files into the official InternVL JSONL format.

Five input formats (``convert(src, dst, fmt)``):

* ``json``     - a JSON list of InternVL records; same result as the official ``tools/json2jsonl.py``.
* ``jsonl``    - an InternVL JSONL file; same result as the official ``tools/jsonl2jsonl.py``.
* ``sharegpt`` - the ShareGPT / "messages" layouts of LLaMA-Factory and ms-swift.
* ``openai``   - OpenAI chat messages with content parts (text, image_url with a path or a data: URL).
* ``pairs``    - preference pairs (TRL, LLaMA-Factory, ms-swift layouts) -> the official preference format.

Every converter writes one ``json.dumps(record, ensure_ascii=False)`` per line and returns a
`ConvertStats`. Input that is not valid JSON, and records that cannot be converted, raise a
`DataError` naming the file and the 1-based line; with ``skip_invalid=True`` bad records go to
``<dst stem>.rejected.jsonl`` instead (one line each: source line, kind, message, original record)
and the counts are returned. Nothing is dropped silently. Output is written to a temporary file
and moved into place only when the conversion succeeds, so a failed run leaves no half-written DST.

Modules: stream.py (reading, writing, rejects), media.py (media references), official.py
(``json`` / ``jsonl``), chat.py (``sharegpt`` / ``openai``), pairs.py (``pairs``), detect.py (tells the record reader which
``--from`` an unconverted record needs). See docs/data-convert.md for the exact rules.
"""

from __future__ import annotations

import os
from typing import Any

from ...errors import DataError
from .chat import openai_to_internvl, sharegpt_to_internvl
from .official import json_to_jsonl, jsonl_to_jsonl
from .pairs import pairs_to_preference
from .stream import ConvertStats, rejected_path_for

__all__ = [
    "FORMATS",
    "ConvertStats",
    "convert",
    "json_to_jsonl",
    "jsonl_to_jsonl",
    "sharegpt_to_internvl",
    "openai_to_internvl",
    "pairs_to_preference",
    "rejected_path_for",
]

FORMATS = ("json", "jsonl", "sharegpt", "openai", "pairs")


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, *, keep_system: bool | None = None,
            skip_invalid: bool = False, **options: Any) -> ConvertStats:
    """Dispatch on ``fmt`` in ``FORMATS``. ``keep_system=None`` uses each format's default
    (``json``/``jsonl``: drop, as the official tools do; ``sharegpt``/``openai``: keep; ``pairs``: reject
    a record with a system prompt, which the preference format cannot hold, unless ``keep_system=False``).
    Extra options (``media_root``, ``source_root``, ``images_dir``) go to the converters that take them.
    """
    if fmt not in FORMATS:
        raise DataError("bad_args", f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    kwargs: dict[str, Any] = {"skip_invalid": skip_invalid}
    if keep_system is not None:
        kwargs["keep_system"] = keep_system
    allowed = {"json": set(), "jsonl": set(), "sharegpt": {"media_root", "source_root"},
               "openai": {"media_root", "source_root", "images_dir"},
               "pairs": {"media_root", "source_root", "images_dir"}}[fmt]
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - allowed
    if unknown:
        raise DataError("bad_args", f"option(s) {sorted(unknown)} do not apply to --from {fmt}")
    kwargs.update(given)
    fn = {"json": json_to_jsonl, "jsonl": jsonl_to_jsonl, "sharegpt": sharegpt_to_internvl,
          "openai": openai_to_internvl, "pairs": pairs_to_preference}[fmt]
    return fn(src, dst, **kwargs)
