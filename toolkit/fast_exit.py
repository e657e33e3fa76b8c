"""End a recipe's process as soon as its work is done.

After a run, the interpreter's own shutdown (tearing down torch, transformers and their thread pools) takes ~1.4 s on
a 2-core machine, more than the checkpoint saves of the default job (benchmarks/vs_nanogpt.py, section 9). The
recipes' `if __name__ == "__main__"` blocks end with `exit_now()`: the atexit handlers still run (tensorboard's
writer, logging), output is flushed, and os._exit skips the rest. Callers of `main()` in-process are not affected,
a test that runs a recipe as __main__ in its own process gets sys.exit instead (tests/conftest.py), and errors and
signals still exit through sys.exit with their own codes.
"""

from __future__ import annotations

import atexit
import os
import sys


def exit_now(code: int = 0) -> None:
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
