"""Timing, sizing and reporting helpers shared by the benchmarks.

Ours is timed by pytest-benchmark (``benchmark.pedantic``, one fresh setup per round); the peer
runs the same number of rounds in the same test, timed with the same clock, so the ratio compares
like with like. Tests never assert on time: figures go to ``benchmark.extra_info`` and to the
summary printed at the end of the run.
"""

from __future__ import annotations

import gc
import os
import shutil
import stat
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 1_000_000
MIB = 1 << 20

# Lines printed by conftest's pytest_terminal_summary, in the order the tests ran.
SUMMARY: list[str] = []


def report(line: str) -> None:
    """Print ``line`` now (visible with ``-s``) and again in the end-of-run summary."""
    print(line)
    SUMMARY.append(line)


def timed_pedantic(
    benchmark: Any,
    target: Callable[..., Any],
    *,
    setup: Callable[[], tuple[tuple[Any, ...], dict[str, Any]] | None] | None = None,
    rounds: int,
    warmup_rounds: int = 0,
) -> tuple[list[float], Any]:
    """Run ``target`` under ``benchmark.pedantic``; return each timed round's duration and the
    last round's result.

    The durations are also measured here so the ratio can be computed whether or not benchmarking
    is enabled (when disabled, pytest-benchmark runs the target exactly once, without warm-up).
    """
    durations: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = target(*args, **kwargs)
        durations.append(time.perf_counter() - start)
        return result

    result = benchmark.pedantic(
        timed, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1
    )
    return (durations[warmup_rounds:] if benchmark.enabled else durations), result


def time_rounds(
    target: Callable[[], object],
    *,
    setup: Callable[[], object] | None = None,
    rounds: int,
    warmup_rounds: int = 0,
) -> list[float]:
    """Time ``rounds`` runs of ``target``, after ``warmup_rounds`` untimed ones; ``setup`` (untimed)
    runs before each."""
    durations: list[float] = []
    for i in range(warmup_rounds + rounds):
        if setup is not None:
            setup()
        start = time.perf_counter()
        target()
        elapsed = time.perf_counter() - start
        if i >= warmup_rounds:
            durations.append(elapsed)
    return durations


@dataclass(frozen=True)
class Comparison:
    """Throughput of ours and a peer over the same input, from their median round times."""

    name: str
    peer: str
    nbytes: int
    ours_s: list[float]
    peer_s: list[float]
    target: float

    @property
    def ours_mbps(self) -> float:
        return self.nbytes / statistics.median(self.ours_s) / MB

    @property
    def peer_mbps(self) -> float:
        return self.nbytes / statistics.median(self.peer_s) / MB

    @property
    def ratio(self) -> float:
        """How many times faster ours is (>1 means faster)."""
        return statistics.median(self.peer_s) / statistics.median(self.ours_s)

    def publish(self, benchmark: Any) -> None:
        benchmark.extra_info.update(
            {
                "bytes": self.nbytes,
                "peer": self.peer,
                "ours_seconds": self.ours_s,
                "peer_seconds": self.peer_s,
                "ours_MBps": round(self.ours_mbps, 1),
                "peer_MBps": round(self.peer_mbps, 1),
                "ratio": round(self.ratio, 2),
                "target_ratio": self.target,
            }
        )
        verdict = "meets" if self.ratio >= self.target else "MISSES"
        report(
            f"{self.name}: ours {self.ours_mbps:.1f} MB/s, {self.peer} {self.peer_mbps:.1f} MB/s,"
            f" ratio {self.ratio:.2f}x ({verdict} target >= {self.target:g}x;"
            f" {self.nbytes / MB:.0f} MB, median of {len(self.ours_s)})"
        )


def apparent_bytes(path: Path) -> int:
    """Sum of the sizes of the regular files at or under ``path`` (directories not counted)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def file_count(path: Path) -> int:
    return sum(len(filenames) for _d, _s, filenames in os.walk(path))


def reset_dir(path: Path) -> Path:
    """Remove ``path`` if present and make sure its parent exists (``path`` itself is not made)."""
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


class FreshStores:
    """A ``pedantic`` setup: each call closes the previous store and opens a new, empty one."""

    def __init__(self, open_store: Callable[[Path], Any], path: Path) -> None:
        self._open = open_store
        self.path = path
        self.store: Any = None

    def __call__(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        self.close()
        reset_dir(self.path)
        self.store = self._open(self.path)
        return (self.store,), {}

    def close(self) -> None:
        """Drop the store so its files are closed before they are measured or removed."""
        store, self.store = self.store, None
        if store is not None:
            close = getattr(store, "close", None)
            if callable(close):
                close()
            del store
            gc.collect()
