"""The one exception type for mistakes a user can make and fix."""


class CogtuneError(Exception):
    """A problem with the user's input, files or settings.

    The message says what was wrong and what to do; the CLI prints it without a traceback and
    exits with status 2.
    """


EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on request with its work saved; run again to continue


class Preempted(CogtuneError):
    """SIGTERM or SIGUSR1 stopped a run after it saved its work; the CLI exits with EXIT_PREEMPTED."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" for none): the part worth quoting to a user."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else ""
