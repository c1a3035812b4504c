"""What the command-line tools share: a user's mistake is answered with one ``error:`` line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


def fail(message: object) -> NoReturn:
    """Print ``error: <first line of message>`` to stderr and exit with status 2."""
    text = str(message).strip()
    print(f"error: {text.splitlines()[0] if text else 'failed'}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose command-line errors go through :func:`fail` (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        fail(message)
