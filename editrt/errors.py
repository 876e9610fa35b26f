"""One exception family for everything a user can get wrong (DESIGN.md contract 5).

Every message names the input and what was expected; the CLI prints it on one line and
exits non-zero. Library bugs are *not* EditError: they keep their traceback.
"""


class EditError(Exception):
    """Base class: bad input given to editrt (CLI exit code 2).

    `field` names the input the error is about, spelled as the keyword argument of the public call that
    took it (`points`, `mask`, `move`, `shadow_region`, ...), or None when no single input is to blame. Front
    ends translate it to their own spelling (an HTTP body field, a CLI option) instead of parsing the message.
    """

    def __init__(self, *args, field: str | None = None):
        super().__init__(*args)
        self.field = field  # BaseException pickles __dict__: the field survives Ray and process pools


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
