"""The one error type for bad input, and the one place it becomes exit code 2.

Library code raises `UserError` with a message that names the file or flag and the problem; it
never prints or exits. Each command's `main` is wrapped in `exit_on_user_error`, which prints
`error: <message>` to stderr and returns 2. Nothing in RUN or OUT may be half-written when it is
raised: checks run before writes.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input (a file, a flag, a run directory): the message says which and what is wrong."""


def exit_on_user_error(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps a command's main(argv) -> exit code: a UserError prints `error: ...` and returns 2."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
    return wrapped
