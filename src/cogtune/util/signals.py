"""Stop requests from a cluster: SIGTERM (preemption, `scancel`) and SIGUSR1 (Slurm's warning
`--signal=USR1@<seconds>`) only set a flag; the running stage checks it at a safe point (a step
boundary, a finished clip), saves its work and raises `Preempted`, which exits with status 75.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early: list[str] = []  # stop signals received before the running stage entered StopRequests
_late: list[str] = []  # stop signals received after the running stage left StopRequests


def catch_stop_signals_early() -> None:
    """Called first thing by the command line, before torch and diffusers are imported (seconds): a
    stop signal received from then on is remembered and honoured by the stage's StopRequests at its
    first safe point (exit status 75, which a Slurm script requeues), where the default action
    would kill the process with status 143."""
    if threading.current_thread() is threading.main_thread():
        for number in STOP_SIGNALS:
            signal.signal(number, _remember)


def hold_stop_signals_to_the_end() -> str | None:
    """Called last by the command line of a process of its own: from here to the process's end, stop
    signals are ignored. Python's shutdown puts back the default handler of every signal it handles
    (not of an ignored one), and under the default SIGTERM kills the process (status 143, which a
    Slurm wrapper takes for a killed job). Returns the stop signal received since the stage's own
    handling ended, for the caller to exit 75 with."""
    if threading.current_thread() is not threading.main_thread():
        return None
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    return (_late or _early or [None])[0]


def _remembered_in(received: list[str]):
    """A handler that notes the first stop signal in `received`."""
    def remember(number, frame) -> None:
        if not received:
            received.append(signal.Signals(number).name)

    return remember


_remember = _remembered_in(_early)
# After the stage's StopRequests: its work is saved or done; the exit status says it was stopped.
_remember_late = _remembered_in(_late)


class StopRequests:
    """Within `with StopRequests() as stop:`, `stop.signal` names the first stop signal received."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def _handle(self, number, frame):
        if self.signal is None:
            self.signal = signal.Signals(number).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        if _early and self.signal is None:  # received while the stage was still being imported
            self.signal = _early[0]
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not _remember else _remember_late)
        self._previous.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a signal sent to the whole job must not kill the workers; the
    main process decides when to stop and ends them itself."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
