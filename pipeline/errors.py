"""The one exception type the CLI turns into a message and exit code 1."""


class PipelineError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message is one line: it names the file, row or id at fault and says
    what to do next. The CLI prints it without a traceback (``--debug`` shows
    one).
    """
