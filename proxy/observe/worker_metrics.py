"""Metrics summed over the workers of one gateway (WORKERS > 1), so a scrape of any
worker reports the whole gateway.

Every worker writes its values to mmap files in one directory and `Metrics.render` sums
all workers with `MultiProcessCollector`. prometheus-client picks its value class once per
process from `PROMETHEUS_MULTIPROC_DIR` when it is first imported; `Metrics` switches the
process over itself (`use_multiprocess_values`, the way the library's own tests do), so no
variable has to be set before any import. That switch is process-wide: one multiprocess
`Metrics` per worker. The parent must hand every run a fresh, empty directory (old files
would be summed in) and call `forget_worker` when a worker exits, so its in-flight gauge
leaves the sum.
"""

from __future__ import annotations

import os

from prometheus_client import multiprocess, values


def use_process_values() -> None:
    """Keep this process's metric values in memory (one process: WORKERS=1).

    prometheus-client chose mmap files at its import when PROMETHEUS_MULTIPROC_DIR was set,
    as another server's setting may leave it (gunicorn's, a chart's): every value would be
    written under that directory, and one that does not exist fails the first metric.
    """
    if values.ValueClass._multiprocess:
        values.ValueClass = values.MutexValue


def use_multiprocess_values(directory: str) -> None:
    """Make this process keep its metric values in mmap files under directory."""
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if values.ValueClass._multiprocess:
        if current != directory:
            raise ValueError(
                f"prometheus-client already writes multiprocess metrics to {current}, "
                f"not {directory}"
            )
        return
    os.makedirs(directory, exist_ok=True)
    # The mmap files' directory is read from the environment when each file is opened.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue(ProcessId())  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated


class ProcessId:
    """This process's id, kept, and taken again in a child forked from it.

    prometheus-client asks for it at every change of a value, to notice a fork (a forked
    child must write files of its own): os.getpid is a system call each time, about a
    dozen a request.
    """

    def __init__(self) -> None:
        self._pid = os.getpid()
        os.register_at_fork(after_in_child=self._forked)

    def __call__(self) -> int:
        return self._pid

    def _forked(self) -> None:
        self._pid = os.getpid()


def forget_worker(multiprocess_dir: str, pid: int) -> None:
    """Drop an exited worker's live gauges (requests in flight) from the sum."""
    multiprocess.mark_process_dead(pid, multiprocess_dir)  # type: ignore[no-untyped-call]  # unannotated in prometheus-client
