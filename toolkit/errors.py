"""Clear, one-line errors for user mistakes.

Anything the user can fix (bad flag, missing file, mismatched sizes) raises `UserError` with a
message that names the problem and the fix. `exit_on_user_error` turns it into one line on stderr
and exit code 2 instead of a traceback wall. Real bugs still raise with a full traceback.
"""

from __future__ import annotations

import argparse
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
