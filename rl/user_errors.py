"""Entry scripts' errors a user can fix from the message alone: one ``error:`` line and exit status 2.

Anything else is a bug and keeps its traceback; ``GRPO_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

# what a user can fix from the message alone: a bad value or option, a missing or wrong file, a port in use
# (not KeyError: a missing key is a bug's error, which keeps its traceback)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, json.JSONDecodeError, OverflowError)


def run_cli(main: Callable[[], object], errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """Run ``main``; a user error becomes one ``error: <message>`` line on stderr and exit status 2."""
    try:
        main()
    except errors as error:
        if os.environ.get("GRPO_DEBUG"):
            raise
        sys.stderr.write(f"error: {error}\n")
        return 2
    return 0
