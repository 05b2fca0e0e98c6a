"""Command-line plumbing shared by every `python -m snlp_lab.X` command: bad input is one `error: ...`
line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad input is a ValueError, which every command prints as one `error: ...` line
    (exit status 2), with no usage block. --help still prints the help and exits 0."""

    def error(self, message):
        raise ValueError(message)


def run_command(main, argv=None) -> int:
    """main(argv), with a ValueError (bad options, files or data) printed as one `error: ...` line on
    stderr and exit status 2: a message, not a traceback."""
    try:
        return main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
