"""Command-line helpers for programs built on the package (the benches): one-line usage errors.

A flag mistake is raised as `UsageError(message)` anywhere below a program's main(); `run_cli` turns it
into `prog: error: <message>` on stderr and exit status 2, as argparse does for its own errors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(SystemExit):
    """A command-line mistake, raised with its one-line message. `run_cli` prints it as argparse does
    (`prog: error: ...`) and exits with status 2, no traceback; uncaught elsewhere it is still a
    SystemExit that prints the message (status 1). str(err) is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_cli(main: Callable[[], object], prog: str) -> None:
    """Run a program's main() as a command: a UsageError becomes `prog: error: <message>` on stderr and
    exit status 2 (as argparse's own errors)."""
    try:
        main()
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
