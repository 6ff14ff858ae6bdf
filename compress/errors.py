"""One exception family for everything a user can get wrong.

The CLI turns a :class:`CompressError` into one line on stderr and exit code 2. Messages say
what is wrong, where, and how to fix it.
"""

from __future__ import annotations


class CompressError(Exception):
    """A problem with the user's input or options. ``str(err)`` is the one-line message."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text = f"{text.rstrip('.')}. {self.fix}"
        return " ".join(text.split())  # always one line


class InputError(CompressError):
    """The input checkpoint is missing, unreadable, corrupt or unsupported."""


class OptionError(CompressError):
    """An option value is invalid or a combination of options is not supported."""


class OutputError(CompressError):
    """The output path cannot be written (exists without --force, not writable, ...)."""
