"""Command-line overrides of a run config: `section.key=value` strings read as YAML values (tags
refused), and the problems of a config traced back to the override that caused them.

    internvl-lora train run.yaml train.lr=1e-4 data.max_length=4096
"""

from __future__ import annotations

import re

import yaml

from .errors import ConfigError


def _override_value(item: str, raw: str):
    """One override's value as a YAML scalar or flow collection. Tags (`!!python/...`, `!!str`) are
    refused: a command-line value is plain data."""
    try:
        if any(isinstance(t, yaml.TagToken) for t in yaml.scan(raw)):
            raise ConfigError([f"override {item}: YAML tags (!...) are not accepted in a value"], "command line")
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        reason = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError([f"override {item}: the value is not valid YAML ({reason})"], "command line") from None


def parse_overrides(overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """`a.b=value` strings to a nested dict (values read as YAML: 1e-4, true, [a, b]) and, for each dotted
    key, the override that set it (to report problems against it)."""
    out: dict = {}
    origin: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r} must look like section.key=value"], "command line")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError([f"override {item!r} must look like section.key=value (an empty key name)"],
                              "command line")
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item}: {'.'.join(parts[:i + 1])} was set to a value by an earlier "
                                   "override, it cannot also be a section"], "command line")
        node[parts[-1]] = _override_value(item, raw)
        origin[".".join(parts)] = item
    return out, origin


def blame_overrides(problems: list[str], origin: dict[str, str]) -> tuple[list[str], bool]:
    """Prefix each problem about a key set on the command line with its override; also whether every
    problem came from an override (then the file is not to blame)."""
    out, all_overrides = [], True
    for text in problems:
        m = re.match(r"(?:unknown key )?([\w.]+)", text)
        key = m.group(1).rstrip(".") if m else ""
        item = next((v for k, v in origin.items() if key and (k == key or k.startswith(key + "."))), None)
        all_overrides &= item is not None
        out.append(f"override {item}: {text}" if item else text)
    return out, all_overrides
