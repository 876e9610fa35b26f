"""One exception family for everything a user can get wrong (DESIGN.md contract 5).

Every message names the input and what was expected; the CLI prints it on one line and
exits non-zero. Library bugs are *not* EditError: they keep their traceback.
"""


class EditError(Exception):
    """Base class: bad input given to editrt (CLI exit code 2)."""


class InputError(EditError, ValueError):
    """An image, mask, point, box, move, task or option is not what was expected."""


class WeightsError(EditError):
    """A weights directory file is missing or malformed."""


class ElementsError(EditError, ValueError):
    """An element file or element edit is invalid (unknown ids, corrupt or mismatched files)."""


class EngineError(EditError):
    """An exported model or engine file is missing, corrupt or does not match its spec."""


class UsageError(InputError):
    """The command line itself is wrong: an unknown option, a missing argument, a bad choice."""
