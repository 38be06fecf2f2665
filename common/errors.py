"""The one base class of "the input is wrong" errors, and the test that entry points use to pick their exit status.

A bad input (a configuration value that cannot work, a shard folder that is not one, a tokenizer that cannot be
found, a model that cannot be built from what was asked) ends a command with a one-line message and exit status 2;
any other exception is a failure of the program and keeps its traceback. Which is which is decided by type: every
bad-input exception of the project subclasses `BadInputError`.

It lives in `common`, which both packages import and which imports neither, because both raise such errors. The
module imports nothing, so an entry point can classify an error without waiting for the model libraries to load.
"""

from __future__ import annotations


class BadInputError(Exception):
    """The input is wrong (exit status 2, one line); the message names the file, option or field at fault."""


def is_bad_input(exc: BaseException) -> bool:
    """Whether `exc` means "the input is wrong" (print its message, exit 2) rather than "the program failed"."""
    return isinstance(exc, BadInputError)
