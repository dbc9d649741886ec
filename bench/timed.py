"""Run a training script with its optimizer steps timed and its peak memory recorded.

    python bench/timed.py RESULT.json SCRIPT.py [args...]
    python bench/timed.py RESULT.json -m MODULE [args...]

Our trainer and the diffusers reference script run under this same wrapper, so both are measured
the same way: a global optimizer-step hook (torch.optim.optimizer.register_optimizer_step_post_hook)
records the time of every step, and at exit RESULT.json gets those times, the peak RSS (VmHWM) at the last step
and at exit and, on a GPU, torch.cuda.max_memory_allocated over the whole run and over the steps
after the first (cuda_training_peak_allocated and _reserved: training alone, without the loading
and dataset encoding before it). The wrapper changes nothing in the script.

The diffusers script imports torchvision for three image functions (resize, crop, InterpolationMode).
Where torchvision cannot be imported (its wheels do not import beside torch 2.13), the wrapper
registers a stand-in for those three, built on torch.nn.functional.interpolate with antialiasing as
torchvision does for tensors. A real torchvision is always preferred.
"""

from __future__ import annotations

import atexit
import enum
import importlib
import importlib.machinery
import json
import resource
import runpy
import sys
import threading
import time
import types

from cogtune.util.rss import peak_rss_bytes  # VmHWM; imports nothing the reference would not


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def sample_rss(timeline: list, interval: float = 0.05) -> None:
    """Append (seconds, RSS bytes) to timeline every interval seconds, for the memory-over-time plot."""
    started = time.perf_counter()
    while True:
        timeline.append((round(time.perf_counter() - started, 3), current_rss_bytes()))
        time.sleep(interval)


def install_torchvision_standin() -> None:
    try:
        importlib.import_module("torchvision")
        return
    except Exception:  # not installed, or a build that does not match this torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    import diffusers.utils
    import torch.nn.functional as F
    import transformers.utils

    # Both libraries decide once, and remember, that torchvision is missing, so they never use the stand-in.
    assert not transformers.utils.is_torchvision_available() and not diffusers.utils.is_torchvision_available()

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    def resize(tensor, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        batched = tensor if tensor.dim() == 4 else tensor.unsqueeze(0)
        mode = interpolation.value
        out = F.interpolate(batched.float(), size=list(size), mode=mode,
                            antialias=antialias and mode != "nearest",
                            align_corners=False if mode != "nearest" else None)
        return (out if tensor.dim() == 4 else out[0]).to(tensor.dtype)

    def crop(tensor, top, left, height, width):
        return tensor[..., top:top + height, left:left + width]

    def module(name: str, **attributes) -> types.ModuleType:
        made = types.ModuleType(name)
        made.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        made.__path__ = []  # a package, so that submodule imports resolve from sys.modules
        made.__dict__.update(attributes)
        sys.modules[name] = made
        return made

    functional = module("torchvision.transforms.functional", resize=resize, crop=crop,
                        InterpolationMode=InterpolationMode)
    transforms = module("torchvision.transforms", functional=functional, InterpolationMode=InterpolationMode)
    module("torchvision", transforms=transforms)


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    result_path, target, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    import torch

    record = {"step_times": [], "peak_rss_bytes_at_last_step": None, "cuda_max_memory_allocated": None,
              "rss_timeline": [], "started": time.perf_counter()}
    threading.Thread(target=sample_rss, args=(record["rss_timeline"],), daemon=True).start()

    def on_step(optimizer, args, kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            if record["step_times"]:  # the peak of the steps after the first (the optimizer state exists)
                record["cuda_training_peak_allocated"] = torch.cuda.max_memory_allocated()
                record["cuda_training_peak_reserved"] = torch.cuda.max_memory_reserved()
            else:  # after the first step: what came before (loading, encoding the dataset) is left out
                record["cuda_max_memory_allocated_before_training"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
        record["step_times"].append(time.perf_counter())
        record["peak_rss_bytes_at_last_step"] = peak_rss_bytes()

    def write_record():
        record["peak_rss_bytes"] = peak_rss_bytes()
        if torch.cuda.is_available():  # the whole run's peak
            record["cuda_max_memory_allocated"] = max(torch.cuda.max_memory_allocated(),
                                                      record.get("cuda_max_memory_allocated_before_training") or 0)
        with open(result_path, "w") as f:
            json.dump(record, f)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(on_step)
    atexit.register(write_record)
    if target == "-m":
        sys.argv = [rest[0], *rest[1:]]
        runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    else:
        install_torchvision_standin()
        sys.argv = [target, *rest]
        sys.path.insert(0, str(__import__("pathlib").Path(target).resolve().parent))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
