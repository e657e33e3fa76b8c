"""How a recipe or command ends: a user mistake as one line, a finished run at once.

Anything the user can fix (bad flag, missing file, mismatched sizes) raises `UserError` with a
message that names the problem and the fix. `exit_on_user_error` turns it into one line on stderr
and exit code 2 instead of a traceback wall. Real bugs still raise with a full traceback.

After a run, the interpreter's own shutdown (tearing down torch, transformers and their thread pools) can take longer
than the default job's checkpoint saves (docs/benchmarks.md, figures behind code comments). The recipes'
`if __name__ == "__main__"` blocks end with `exit_now()`: the atexit handlers still run (tensorboard's writer,
logging), output is flushed, and os._exit skips the rest. Callers of `main()` in-process are not affected, a test
that runs a recipe as __main__ in its own process gets sys.exit instead (tests/conftest.py), and errors and signals
still exit through sys.exit with their own codes.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import sys

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem in the user's input or environment, with the fix in the message."""


def exit_on_user_error(main):
    """Decorator for a recipe/command `main`: UserError -> 'error: ...' on stderr, exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            rank = os.environ.get("RANK")
            prefix = "error" if rank in (None, "0") else f"error (rank {rank})"
            print(f"{prefix}: {err}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapper


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for the `toolkit` subcommands: a usage mistake is one UserError line, not the usage block."""

    def error(self, message):
        raise UserError(f"{message}; see `{self.prog} --help`")


def exit_now(code: int = 0) -> None:
    """End the process at once, its atexit handlers run and its output flushed (see the module docstring)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
