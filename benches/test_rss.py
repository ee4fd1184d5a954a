"""Peak memory while importing a tar holding 1 GiB of content, in a child process of its own.

Target (asserted: memory, not time): peak RSS < 256 MiB. casync's peak on the same tar is reported
beside it for context (through GNU time, when /usr/bin/time is installed).

The child reads its peak from ``VmHWM`` in /proc/self/status, which belongs to the address space
made at exec. ``getrusage``'s ``ru_maxrss`` would not do: exec carries the old address space's peak
over into it, and Python's subprocess starts children with vfork, so the child would report the
peak of the whole benchmark session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benches.measure import MB, MIB, report, reset_dir, timed_pedantic
from benches.peers import casync_path

pytestmark = pytest.mark.benchmark(group="memory")

LIMIT = 256 * MIB

# The baseline is the peak after `import layerstore` and opening the store.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    import layerstore as ls

    def peak_rss():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    store = ls.Store(sys.argv[1])
    baseline = peak_rss()
    start = time.perf_counter()
    layer = store.import_tar(sys.argv[2])
    seconds = time.perf_counter() - start
    peak = peak_rss()
    stats = dict(store.stats())
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds,
                      "size": layer.size, "stats": stats}))
    """
)
GNU_TIME = "/usr/bin/time"


def _import_in_child(store: Path, tar: Path) -> dict[str, Any]:
    reset_dir(store)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), str(tar)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _casync_peak(store: Path, tar: Path, index: Path) -> int | None:
    """casync make's peak RSS as GNU time reports it (it forks, so nothing of ours is counted)."""
    casync = casync_path()
    if casync is None or not os.access(GNU_TIME, os.X_OK):
        return None
    reset_dir(store)
    out = index.with_suffix(".time")
    command = [casync, f"--store={store}", "make", str(index), str(tar)]
    subprocess.run(
        [GNU_TIME, "-f", "%M", "-o", str(out), *command], check=True, stdout=subprocess.DEVNULL
    )
    return int(out.read_text().split()[-1]) * 1024


def test_peak_rss_import_1gib(benchmark: Any, ls: ModuleType, big_tar: Path, scratch: Path) -> None:
    _, child = timed_pedantic(
        benchmark, lambda: _import_in_child(scratch / "store", big_tar), rounds=1
    )
    peak = child["peak"]
    assert child["size"] == big_tar.stat().st_size
    peer = _casync_peak(scratch / "casync", big_tar, scratch / "big.caibx")
    benchmark.extra_info.update(
        {
            "peak_rss_bytes": peak,
            "baseline_rss_bytes": child["baseline"],
            "import_seconds": child["seconds"],
            "import_MBps": round(child["size"] / child["seconds"] / MB, 1),
            "casync_peak_rss_bytes": peer,
            "limit_bytes": LIMIT,
            "stats": child["stats"],
        }
    )
    peer_text = f", casync make {peer / MIB:.0f} MiB" if peer is not None else ""
    report(
        f"peak RSS importing {big_tar.stat().st_size / MIB:.0f} MiB tar: ours {peak / MIB:.0f} MiB"
        f" (after import layerstore + open: {child['baseline'] / MIB:.0f} MiB){peer_text};"
        f" {'meets' if peak < LIMIT else 'MISSES'} limit < {LIMIT / MIB:.0f} MiB;"
        f" {child['size'] / child['seconds'] / MB:.0f} MB/s,"
        f" stored {child['stats'].get('stored_bytes', 0) / MB:.0f} MB"
    )
    assert peak < LIMIT, f"peak RSS {peak / MIB:.0f} MiB >= {LIMIT / MIB:.0f} MiB"
