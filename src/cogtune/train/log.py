"""train_log.jsonl: one JSON object per optimizer step (step, loss, lr, grad_norm, step_seconds,
peak_memory_mib; a skipped step has "loss": null and a "skipped" reason), kept across resumes so
that it always holds the whole run's history."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from cogtune.util import files, logs

TRAIN_LOG_NAME = "train_log.jsonl"


def logged_step(line: str) -> float:
    """The step of a train_log.jsonl line; a line cut short by a killed run counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def keep_up_to(log_path: Path, step: int) -> None:
    """Keep the lines of the steps up to `step` (a resumed run's history), no more."""
    kept = [line for line in (log_path.read_text().splitlines() if log_path.is_file() else [])
            if logged_step(line) <= step]
    files.write_text(log_path, "".join(f"{line}\n" for line in kept))


def append(log_path: Path, record: dict) -> None:
    with log_path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(log_path: Path) -> list[dict]:
    """The records of a log; a line cut short by a killed run is left out."""
    records = []
    for line in log_path.read_text().splitlines() if log_path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class StepLog:
    """What each optimizer step leaves: its train_log.jsonl line (main process), a `step` event, the
    trackers' scalars and the progress bar's figures; and the count of steps in a row whose loss or
    gradient was not finite (such a step is skipped, with a warning and a "skipped" reason)."""

    def __init__(self, path: Path, accelerator, progress):
        self.path, self.accelerator, self.progress = path, accelerator, progress
        self.losses: list[float] = []  # the finite losses of this run
        self.non_finite_in_a_row = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.step_started = time.time()

    def write(self, step: int, loss: float, finite: bool, lr: float, grad_norm: float | None,
              peak_memory_mib: float, peak_reserved_mib: float | None = None) -> dict:
        step_seconds = time.time() - self.step_started
        self.restart_clock()
        record = {"step": step, "loss": loss if finite else None, "lr": lr,
                  "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                  "step_seconds": round(step_seconds, 4), "peak_memory_mib": round(peak_memory_mib, 1)}
        if peak_reserved_mib is not None:  # on a GPU: what the caching allocator held at most
            record["peak_reserved_mib"] = round(peak_reserved_mib, 1)
        if finite:
            self.non_finite_in_a_row = 0
            self.losses.append(loss)
            self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", grad_norm=f"{record['grad_norm'] or 0:.3f}",
                                      s_per_step=f"{step_seconds:.2f}")
        else:
            self.non_finite_in_a_row += 1
            record["skipped"] = f"non-finite loss {loss} or gradient norm {grad_norm}"
            logs.message(f"warning: step {step} skipped: the loss ({loss}) or the gradient norm ({grad_norm}) is not "
                         f"finite ({self.non_finite_in_a_row} in a row).")
        self.progress.update(1)
        if self.accelerator.is_main_process:
            append(self.path, record)
        logs.event("step", **record)
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                             step=step)
        return record

    def close(self) -> None:
        self.progress.close()
