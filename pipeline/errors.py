"""The one exception type the CLI turns into a message and exit code 1."""
from __future__ import annotations

_WORKER_HEADER = "Caught PipelineError in DataLoader worker"
_WORKER_LAST_LINE = "pipeline.errors.PipelineError: "


class PipelineError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message is one line: it names the file, row or id at fault and says
    what to do next. The CLI prints it without a traceback (``--debug`` shows
    one).

    A DataLoader worker's PipelineError is re-raised in the main process as
    ``PipelineError("Caught ... Original Traceback ...")``; the constructor keeps
    the original one-line message and moves the worker's traceback into a note,
    which only a traceback (``--debug``) shows.
    """

    def __init__(self, *args: object) -> None:
        message = args[0] if len(args) == 1 else None
        if isinstance(message, str) and message.startswith(_WORKER_HEADER):
            lines = [line for line in message.splitlines() if line.startswith(_WORKER_LAST_LINE)]
            if lines:
                super().__init__(lines[-1][len(_WORKER_LAST_LINE):])
                if hasattr(self, "add_note"):  # Python 3.11+
                    self.add_note(message)
                return
        super().__init__(*args)


def check_choice(flag: str, value: object, choices: tuple) -> None:
    """An error listing the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise PipelineError(f"{flag} {value!r} is not one of: {', '.join(map(str, choices))}")
