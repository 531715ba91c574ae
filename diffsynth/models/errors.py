"""Errors raised while reading model files.

Kept in a module of its own so that every loader (state dicts, LoRA, textual
inversion, the model manager) raises the same type and callers can catch one
thing: ``except ModelFileError``.
"""

from __future__ import annotations

import os

__all__ = ["ModelFileError"]


class ModelFileError(ValueError):
    """A model file exists but cannot be used: truncated, corrupt, or unsafe.

    The message always names the file, says what went wrong and what to do.
    ``path`` holds the offending file so that a UI can point at it.
    """

    def __init__(self, path: str | os.PathLike, problem: str, remedy: str):
        self.path = os.fspath(path)
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"{self.path}: {problem} {remedy}")
