"""The one exception type for user mistakes.

A `UserError` is printed as one line on stderr with exit code 2 (no traceback unless
`--debug`). Raise it for anything the user can fix: a bad flag, a missing file, a
shape mismatch. Raise it *before* heavy work starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2."""


def closest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean `x`?)' for the closest choice, or ''."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""


def unknown(kind: str, word: str, choices: Iterable[str]) -> UserError:
    choices = sorted(choices)
    return UserError(
        f"unknown {kind} `{word}`{closest(word, choices)}; choose from: {', '.join(choices)}"
    )
