"""The errors a command ends with on purpose, and the one place each becomes its exit code.

Library code raises `UserError` with a message that names the file or flag and the problem; it
never prints or exits. Each command's `main` is wrapped in `exit_on_user_error`, which prints
`error: <message>` to stderr and returns 2. Nothing in RUN or OUT may be half-written when it is
raised: checks run before writes.

Running out of disk space is not bad input, and not a bug: it ends with exit 74 and a message
that says "no space left on device" and names what was being written. Writers that matter (a
checkpoint, the pruned model, an export, a gate snapshot, a data shard) run inside `writing(PATH)`,
which removes their partial output (so the space comes back) and names PATH; any other write that
runs out of space still ends with 74, named as well as the error allows. Everything is published
by rename after it is complete, so the last good copy is still in place: free space and run the
same command again.
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

EXIT_BAD_INPUT = 2
EXIT_NO_SPACE = 74  # sysexits.h EX_IOERR
# Below this many free bytes, a failed write is taken to have run out of space: the writers do not
# all say so (torch's zip writer: "unexpected pos ...", numpy: "N requested and M written").
LOW_SPACE = 1 << 20
NO_SPACE_WORDS = ("no space left on device", "os error 28", "disk quota exceeded")


class UserError(Exception):
    """Bad input (a file, a flag, a run directory): the message says which and what is wrong."""


class NoSpace(Exception):
    """A write ran out of disk space (or quota)."""

    def __init__(self, path: Path | str | None, cause: BaseException | None = None):
        where = f"writing {path}" if path is not None else "while writing"
        detail = f" ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})" if cause and str(cause).strip() else ""
        super().__init__(f"no space left on device {where}{detail}; the last good copy is kept: free "
                         "space and run the same command again")


def free_bytes(path: Path | str) -> int | None:
    """Free bytes on the file system holding path (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def out_of_space(e: BaseException, path: Path | str | None = None) -> bool:
    """Whether e, or an exception it was raised from, is a write that ran out of space; with path,
    also when the file system holding path is (nearly) full."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(w in str(seen).lower() for w in NO_SPACE_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    free = free_bytes(path) if path is not None else None
    return free is not None and free < LOW_SPACE


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def writing(path: Path | str, partial: list[Path | str] | tuple = ()) -> Iterator[None]:
    """Runs a write of PATH: running out of space becomes NoSpace naming PATH, after the partial
    output (the paths in `partial`: temporaries never published) is removed to give the space back."""
    try:
        yield
    except NoSpace:
        raise
    except Exception as e:
        if not out_of_space(e, path):
            raise
        for p in partial:
            _remove(Path(p))
        raise NoSpace(path, e) from e


def exit_on_user_error(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps a command's main(argv) -> exit code: a UserError prints `error: ...` and returns 2;
    running out of disk space prints `error: no space left on device ...` and returns 74."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        except NoSpace as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_NO_SPACE
        except Exception as e:
            if not out_of_space(e):
                raise
            print(f"error: {NoSpace(getattr(e, 'filename', None), e)}", file=sys.stderr, flush=True)
            return EXIT_NO_SPACE
    return wrapped
