"""What a run tells its user: progress bars with rate and ETA on a terminal, plain progress lines
when stderr is a file (a batch job's log), or, with `--log_format json`, one JSON object per line
on stdout for cluster log collectors.

Every JSON line has `time` (UTC, ISO 8601) and `event`; the other keys depend on the event:
`progress` (task, done, total, unit, rate, eta_s), `step` (the train_log.jsonl record), `checkpoint`,
`validation`, `message`, `result` and `error`. Progress lines come at most every
PROGRESS_EVERY_S seconds per task, and once when a task ends.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone

from tqdm import tqdm

PROGRESS_EVERY_S = 10.0
FORMATS = ("text", "json")
_state = {"format": "text", "enabled": True}

# What libraries say on their own while they are imported or used, which is not for our users:
# torchao's optional kernels that this machine cannot load (transformers imports torchao whenever it is
# installed, and peft imports transformers), torch's deprecation notes about torchao's enums, and diffusers'
# note that torchao's tensor types are missing. Their errors still come through.
LIBRARY_NOISE = ("torchao", "torch.utils._pytree", "diffusers.quantizers")


def quiet_libraries() -> None:
    """Keep LIBRARY_NOISE's warnings out of our output (their errors still show)."""
    import logging

    for name in LIBRARY_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def configure(log_format: str, enabled: bool = True) -> None:
    """Set the format for this process; `enabled=False` silences it (the non-main processes of a
    multi-GPU run, so that a log holds each event once)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {FORMATS}")
    _state.update(format=log_format, enabled=enabled)
    if not draws_bars():  # the libraries' own bars (loading weights) would garble the log
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


def json_lines() -> bool:
    return _state["format"] == "json"


def _terminal() -> bool:
    return sys.stderr.isatty()


def draws_bars() -> bool:
    """Whether progress is drawn as bars (text mode on a terminal) rather than reported in lines."""
    return not json_lines() and _terminal()


def event(name: str, **fields) -> None:
    """A JSON line in json mode; nothing in text mode (the caller shows it its own way)."""
    if json_lines() and _state["enabled"]:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": name, **fields}
        print(json.dumps(record, default=str), flush=True)


def message(text: str, **fields) -> None:
    """A line for the user: on stderr beside the progress bars, or a `message` event."""
    if not _state["enabled"]:
        return
    if json_lines():
        event("message", text=text, **fields)
    else:
        tqdm.write(text, file=sys.stderr)


def result(text: str, **fields) -> None:
    """A stage's outcome (the LoRA path, a video path, a summary): stdout in either format."""
    if not _state["enabled"]:
        return
    if json_lines():
        event("result", text=text, **fields)
    else:
        print(text, flush=True)


class _LineProgress:
    """tqdm's interface, reporting a line at most every PROGRESS_EVERY_S seconds (and at the end)
    instead of drawing a bar: a `progress` event in json mode, else a plain text line."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0, **_):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start_n = initial
        self.started = self.reported = time.monotonic()
        self.postfix: dict = {}

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.reported >= PROGRESS_EVERY_S:
            self._report()

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        self.postfix = dict(ordered_dict or {}, **kwargs)

    def set_description(self, desc: str, refresh=True) -> None:
        self.desc = desc

    def _report(self) -> None:
        self.reported = now = time.monotonic()
        rate = (self.n - self.start_n) / max(now - self.started, 1e-9)
        eta = (self.total - self.n) / rate if self.total is not None and rate > 0 else None
        if json_lines():
            event("progress", task=self.desc, done=self.n, total=self.total, unit=self.unit, rate=round(rate, 4),
                  eta_s=None if eta is None else round(eta, 1), **self.postfix)
            return
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        timing = f", {rate:.0f} {self.unit}/s" if rate >= 100 else f", {rate:.3g} {self.unit}/s"
        if eta is not None and self.n < (self.total or 0):
            timing += f", {eta:.0f} s left"
        extra = "".join(f", {key} {value}" for key, value in self.postfix.items())
        message(f"{self.desc}: {done} {self.unit}{percent}{timing}{extra}")

    def close(self) -> None:
        if self.iterable is not None or self.n != self.start_n or self.total == 0:
            self._report()
        self.iterable = None
        self.start_n = self.n  # a second close reports nothing new

    @staticmethod
    def write(text: str, **_) -> None:
        message(text)


def progress(iterable=None, *, total=None, desc: str, unit: str = "it", disable: bool = False, **kwargs):
    """A progress bar (rate and ETA) over `iterable` or up to `total` on a terminal; plain lines when
    stderr is a file; JSON progress events in json mode."""
    disable = disable or not _state["enabled"]
    if json_lines() and not disable:
        return _LineProgress(iterable, total=total, desc=desc, unit=unit, **kwargs)
    if not _terminal() and not disable and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true"):
        return _LineProgress(iterable, total=total, desc=desc, unit=unit, **kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
