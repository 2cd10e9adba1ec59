"""Small helpers shared by the ``mosaic-fast`` sub-commands (train, eval, bench, info).

Kept free of any ``mosaic_fast`` import so every command module can use it without import cycles.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class ShortUsageParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are three short lines instead of the whole usage block.

    argparse prints the full usage (about 35 lines for ``train``) above the one line that matters;
    here a bad option gives ``usage: PROG [options]``, ``PROG: error: ...`` and where to find the
    options. ``--help`` is unchanged. ``short_usage`` replaces ``PROG [options]`` in the first line.
    """

    def __init__(self, *args, short_usage: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.short_usage = short_usage or f"{self.prog} [options]"

    def error(self, message: str) -> NoReturn:
        """Exit with status 2 after the short usage line, the error and a pointer to ``--help`` (argparse
        would print its whole usage block)."""
        self.exit(2, f"usage: {self.short_usage}\n{self.prog}: error: {message}\n"
                     f"run '{self.prog} --help' for all options\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help, except where the default says nothing (None, False
    for a flag) or the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``"1 step"``, ``"3 steps"`` (``many``: an irregular plural)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"
