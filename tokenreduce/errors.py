"""The exceptions a user mistake raises.

Every error that a user can cause and fix — an option value, a file, a model this library does
not support, an API call out of order — is a `TokenReduceError`. Each subclass is also the
built-in exception a caller would expect (ValueError, TypeError, FileNotFoundError,
RuntimeError), so existing `except` clauses keep working. The CLI turns exactly these into exit
status 2 with a one-line message; anything else is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "InvalidOptionError",
    "InvalidTypeError",
    "MissingFileError",
    "NotReadyError",
    "TokenReduceError",
    "UnreachableTargetError",
    "UnsupportedModelError",
]


class TokenReduceError(Exception):
    """Base of every user error raised by tokenreduce."""


class InvalidOptionError(TokenReduceError, ValueError):
    """An option, argument or file content has a value that is not accepted."""


class UnreachableTargetError(InvalidOptionError):
    """A cost target that the method's strongest setting does not reach on this model."""


class InvalidTypeError(TokenReduceError, TypeError):
    """An argument is of a kind that is not accepted."""


class UnsupportedModelError(InvalidTypeError):
    """The model (or one of its modules) belongs to a family no adapter supports."""


class MissingFileError(TokenReduceError, FileNotFoundError):
    """A file or folder the user named, or a package file it needs, does not exist."""


class NotReadyError(TokenReduceError, RuntimeError):
    """An API call made before what it depends on (e.g. last_info before any forward pass)."""
