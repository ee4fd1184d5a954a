"""Image analysis: the shape of :meth:`layerstore.Store.analyze`'s report, and dive's CI rules.

The report is computed in the Rust core from the layers' indices (no tar or file content is
read) and handed over as plain data; the ``TypedDict`` classes below describe it. Its keys are a
superset of dive's ``--json`` output where they mean the same (``layer[].index``, ``id``,
``digestId``, ``sizeBytes``, ``command``; ``image.sizeBytes``, ``inefficientBytes``,
``efficiencyScore``, ``fileReference[].count/sizeBytes/file``).

CI rules are dive's, read as dive reads them (a ``.dive-ci`` file's ``rules:`` mapping, or
flags): ``lowestEfficiency`` (fails when dive's efficiency score is below it),
``highestWastedBytes`` (fails when dive's wasted bytes exceed it; ``20MB``, ``1.5GiB``, bytes),
``highestUserWastedPercent`` (fails when wasted bytes / the bytes of every layer but the first
exceed it, a ratio between 0 and 1; 0 when every layer but the first is empty, where dive
divides by zero). A rule whose value is ``disabled`` is skipped.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

__all__ = [
    "DEFAULT_RULES",
    "Analysis",
    "Comparison",
    "FileReference",
    "FileRow",
    "ImageAnalysis",
    "LayerAnalysis",
    "RuleResult",
    "Touch",
    "UpdateCost",
    "WasteItem",
    "WasteKind",
    "WasteReport",
    "WasteTotal",
    "evaluate_rules",
    "parse_bytes",
    "read_rules",
]

WasteKind = Literal["metadata_only", "shadowed", "deleted", "duplicate", "near_duplicate"]


class LayerAnalysis(TypedDict):
    """One layer: dive's fields, then what the layer does to the view below it."""

    index: int
    id: str
    digestId: str
    #: dive's layer size: the entries' sizes added up.
    sizeBytes: int
    command: str
    createdBy: str | None
    tarBytes: int
    compressedBytes: int | None
    entries: int
    filesAdded: int
    bytesAdded: int
    filesModified: int
    bytesModified: int
    filesDeleted: int
    bytesDeleted: int
    metadataOnly: int
    metadataOnlyBytes: int
    whiteouts: int
    opaques: int
    #: Bytes this layer ships that are waste, of any kind.
    wastedBytes: int
    #: Waste this layer causes: copies below it re-ships, replaces or deletes, and the duplicate or
    #: near-duplicate content it ships itself.
    causedWasteBytes: int


class FileReference(TypedDict):
    """dive's record of a path seen in more than one layer (``sizeBytes``: all sizes summed)."""

    count: int
    sizeBytes: int
    file: str


class ImageAnalysis(TypedDict):
    """Image-wide figures: dive's (the first six) and ours."""

    sizeBytes: int
    inefficientBytes: int
    efficiencyScore: float
    fileReference: list[FileReference]
    userSizeBytes: int
    userWastedPercent: float
    layers: int
    tarBytes: int
    compressedBytes: int | None
    shippedBytes: int
    liveBytes: int
    liveFiles: int
    wastedBytes: int
    efficiency: float


class WasteItem(TypedDict):
    """One wasted copy: its path, the layer that shipped it then the one that made it waste."""

    kind: WasteKind
    path: str
    layers: list[int]
    bytes: int
    otherPath: str | None
    reason: str


class WasteTotal(TypedDict):
    """Waste of one kind, summed."""

    count: int
    bytes: int


class WasteReport(TypedDict):
    """Waste by kind (the five are disjoint) and item by item, largest first."""

    totals: dict[WasteKind, WasteTotal]
    items: list[WasteItem]


class Touch(TypedDict):
    """One layer's touch of a path: ``entry``, ``whiteout`` (of it or an ancestor), ``opaque``."""

    layer: int
    touch: Literal["entry", "whiteout", "opaque"]


class FileRow(TypedDict):
    """A non-directory path the image shows, its providing layer and its layer history."""

    path: str
    kind: str
    size: int
    layer: int
    history: list[Touch]


class Analysis(TypedDict):
    """What :meth:`layerstore.Store.analyze` returns (and ``layerstore analyze --json`` prints).

    ``files`` is present only when asked for (``analyze(image, files=True)``).
    """

    image: ImageAnalysis
    layer: list[LayerAnalysis]
    waste: WasteReport
    files: NotRequired[list[FileRow]]


class UpdateCost(TypedDict):
    """What pulling image ``b`` costs with ``a`` present: whole layers, whole files, chunks."""

    layers: int
    layerBytes: int
    layerCompressedBytes: int | None
    files: int
    fileBytes: int
    chunks: int
    chunkBytes: int


class Comparison(TypedDict):
    """What :meth:`layerstore.Store.compare` returns."""

    sharedLayers: list[int]
    sharedLayerBytes: int
    bChunks: int
    bChunkBytes: int
    sharedChunks: int
    sharedChunkBytes: int
    update: UpdateCost


#: dive's defaults when neither a file nor a flag sets a rule.
DEFAULT_RULES: dict[str, str] = {
    "lowestEfficiency": "0.9",
    "highestWastedBytes": "disabled",
    "highestUserWastedPercent": "0.1",
}

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_bytes(text: str) -> int:
    """A byte count as dive reads one: ``20MB`` (SI), ``20MiB`` (binary), ``1.5 GB``, ``4096``."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte count: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def read_rules(path: str | Path) -> dict[str, str]:
    """The rules of a ``.dive-ci`` file (the ``rules:`` mapping of its YAML; flat keys too)."""
    rules: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip() or line.strip() == "rules:":
            continue
        key, sep, value = line.strip().partition(":")
        if not sep:
            raise ValueError(f"{path}: cannot read line {raw!r}")
        value = value.strip().strip("\"'")
        if key not in DEFAULT_RULES:
            raise ValueError(f"{path}: unknown rule {key!r}")
        rules[key] = value
    return rules


@dataclasses.dataclass(frozen=True)
class RuleResult:
    """One rule's verdict: ``status`` is ``pass``, ``fail`` or ``skip``; ``message`` says why."""

    rule: str
    status: Literal["pass", "fail", "skip"]
    message: str


def evaluate_rules(analysis: Analysis, rules: dict[str, str]) -> list[RuleResult]:
    """dive's three CI rules over ``analysis`` (defaults for the rules ``rules`` leaves out)."""
    merged = {**DEFAULT_RULES, **rules}
    image = analysis["image"]
    out: list[RuleResult] = []
    for rule in sorted(merged):
        value = merged[rule].strip()
        if value.lower() == "disabled":
            out.append(RuleResult(rule, "skip", "disabled"))
            continue
        if rule == "lowestEfficiency":
            limit = float(value)
            actual = image["efficiencyScore"]
            broken = actual < limit
            message = f"image efficiency {actual:.4f} is below {limit}"
        elif rule == "highestWastedBytes":
            limit_bytes = parse_bytes(value)
            wasted = image["inefficientBytes"]
            broken = wasted > limit_bytes
            message = f"wasted bytes {wasted} exceed {limit_bytes} ({value})"
        else:
            limit = float(value)
            actual = image["userWastedPercent"]
            broken = not math.isnan(actual) and actual > limit
            message = f"user wasted percent {actual:.4f} exceeds {limit}"
        out.append(RuleResult(rule, "fail" if broken else "pass", message if broken else "ok"))
    return out
