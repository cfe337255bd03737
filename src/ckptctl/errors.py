"""Errors that reach the user as one line on stderr and an exit code.

Every message should say what is wrong with which file, and where possible what to do next.
The CLI maps these to exit codes; nothing else in ckptctl prints them.
"""

from __future__ import annotations

import os


class CkptError(Exception):
    """Base of every error ckptctl reports cleanly."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.message = message
        self.path = os.fspath(path) if path is not None else None

    def __str__(self) -> str:
        if self.path:
            return f"{self.path}: {self.message}"
        return self.message


class NotFound(CkptError):
    """The path does not exist or cannot be opened."""


class UnknownFormat(CkptError):
    """The file is not a checkpoint format ckptctl understands."""


class CorruptFile(CkptError):
    """The file claims a known format but its bytes do not hold together."""


class UnsafeFile(CkptError):
    """The file asks for code execution and the operation refuses to go on."""


class Incompatible(CkptError):
    """The request cannot be carried out on these inputs (dtype the target cannot hold, ...)."""


class UsageError(CkptError):
    """The command line asks for something contradictory or impossible."""

    exit_code = 2
