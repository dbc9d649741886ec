"""The one exception type for mistakes a user can make and fix."""


class CogtuneError(Exception):
    """A problem with the user's input, files or settings.

    The message says what was wrong and what to do; the CLI prints it without a traceback and
    exits with status 2.
    """
