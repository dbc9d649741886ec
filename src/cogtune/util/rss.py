"""The peak memory of this process, read the same way on every Linux machine."""

from __future__ import annotations


def peak_rss_bytes() -> int:
    """The peak RSS of this process. VmHWM starts afresh when a process execs; ru_maxrss does not
    (a child of a big parent would report the parent's size), so VmHWM is preferred."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
