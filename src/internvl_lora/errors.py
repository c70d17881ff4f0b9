"""Errors a user can act on.

Every problem caused by input (a config, a dataset line, a checkpoint folder) is raised as a
`UserError`; the CLI prints its message as one paragraph and exits non-zero, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message says what to fix."""


class ConfigError(UserError):
    """A bad configuration: lists every problem found, not only the first."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class CheckpointError(UserError):
    """A checkpoint folder that cannot be read or mapped; names the file."""


class DataError(UserError):
    """One bad sample: names the file and the 1-based line."""

    def __init__(self, kind: str, message: str, path: str | None = None, line: int | None = None):
        self.kind, self.path, self.line, self.detail = kind, path, line, message
        where = f"{path}:{line}: " if path is not None and line is not None else (f"{path}: " if path else "")
        super().__init__(f"{where}[{kind}] {message}")

    def __reduce__(self):  # pickled whole (a loader worker sends it to the main process), not from its text
        return type(self), (self.kind, self.detail, self.path, self.line)


class CheckpointSaveError(UserError):
    """Writing a checkpoint or the final adapter failed (disk full, permissions, ...)."""
