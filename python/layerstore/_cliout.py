"""Output conventions of the command line: one unit family, plurals, tables, JSON, progress.

Sizes are binary (KiB, MiB: what ``du -h`` and ``ls -lh`` print) everywhere, the progress bar
included; counts have thousands separators and a noun that agrees with them ("1 layer").
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import layerstore as ls

__all__ = [
    "format_time",
    "human_bytes",
    "image_json",
    "layer_json",
    "plural",
    "print_json",
    "print_table",
    "progress_bar",
    "short_digest",
    "warn",
]

PROG = "layerstore"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as du -h and ls -lh use)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plural(n: int, noun: str, many: str | None = None) -> str:
    """'1 layer', '2 layers', '1,024 entries' (`many` when adding an 's' is wrong)."""
    return f"{n:,} {noun if n == 1 else (many or noun + 's')}"


def short_digest(digest: str, n: int = 12) -> str:
    """'blake3:0123456789abcdef…' -> '0123456789ab' (a prefix the CLI accepts back)."""
    return digest.split(":", 1)[-1][:n]


def format_time(unix: float) -> str:
    """Local time to the minute, as ``ls -l --time-style=+%Y-%m-%d %H:%M`` prints it."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(unix))


def print_json(doc: object, out: TextIO | None = None) -> None:
    """One JSON document on stdout (ASCII: non-UTF-8 names stay representable)."""
    stream = sys.stdout if out is None else out
    json.dump(doc, stream, indent=2, ensure_ascii=True)
    stream.write("\n")


def print_table(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> None:
    """Columns padded to the widest cell; column indices in `right` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip())


@contextmanager
def progress_bar(
    description: str,
    total: int | Callable[[], int | None] | None,
    enabled: bool,
    *,
    parts: bool = False,
) -> Iterator[Callable[[int], None] | None]:
    """Yield a ``progress(bytes_done)`` callback drawing a tqdm bar on stderr, or None.

    With a `total` the bar shows a percentage and an ETA; a callable `total` is called only
    when a bar is drawn (it may cost a little). With `parts`, the work is done in parts (one
    layer after another) that each count from zero: a count below the last one starts a new
    part. Without it, a lower count (threads reporting out of order) is ignored. No bar without
    a terminal on stderr (or without tqdm). Units are binary, as everywhere else in the CLI:
    tqdm scales by 1024 and prints "Mi" + "B".
    """
    if not enabled or sys.stderr is None or not sys.stderr.isatty():
        yield None
        return
    try:
        tqdm_module = importlib.import_module("tqdm")
    except ImportError:
        yield None
        return
    if callable(total):
        total = total()
    bar = tqdm_module.tqdm(
        total=total,
        desc=description,
        unit="iB",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        # Counts carry the unit too ("6.0MiB/19.1MiB"), not only the rate.
        bar_format="{l_bar}{bar}| {n_fmt}{unit}/{total_fmt}{unit} [{elapsed}<{remaining}, "
        "{rate_fmt}]"
        if total
        else "{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}]",
    )
    before = last = 0

    def update(done: int) -> None:
        nonlocal before, last
        if done < last:
            if not parts:
                return
            before += last
        shown = bar.n
        last = done
        if before + done > shown:
            bar.update(before + done - shown)

    try:
        yield update
    finally:
        bar.close()


def warn(message: str) -> None:
    """``layerstore: warning: MESSAGE`` on stderr, on one line."""
    text = " ".join(message.split())
    sys.stderr.write(f"{PROG}: warning: {text}\n")
    sys.stderr.flush()


def layer_json(layer: ls.Layer) -> dict[str, Any]:
    """The JSON shape of a layer (``ls``, ``show``, ``import``)."""
    return {
        "id": layer.id,
        "diff_id": layer.diff_id,
        "tree_id": layer.tree_id,
        "size": layer.size,
        "entry_count": layer.entry_count,
        "compressed_digest": layer.compressed_digest,
        "compression": layer.compression,
        "blobs": layer.blobs(),
        "created": layer.created,
    }


def image_json(image: ls.Stack) -> dict[str, Any]:
    """The JSON shape of an image as an import reports it."""
    return {
        "digest": image.digest,
        "config_digest": image.config_digest,
        "chain_id": image.chain_id,
        "layers": [layer.diff_id for layer in image.layers],
    }
