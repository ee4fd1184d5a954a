"""Every public name of the Python API says what it does (help() shows it)."""

from __future__ import annotations

import inspect

import layerstore as ls
import pytest

CLASSES = [ls.Store, ls.Stack, ls.Layer, ls.Entry, ls.Stat, ls.Limits, ls.Container, ls.StackPath]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_public_method_and_property_has_a_docstring(cls: type) -> None:
    assert (cls.__doc__ or "").strip(), f"{cls.__name__} has no docstring"
    missing = [
        name
        for name, member in vars(cls).items()
        if not name.startswith("_") and not (inspect.getdoc(member) or "").strip()
    ]
    assert missing == [], f"{cls.__name__}: no docstring on {missing}"


def test_the_report_types_are_the_reports_shapes(store: ls.Store) -> None:
    for typed in (ls.StoreStats, ls.GcReport, ls.FsckReport, ls.DamagedChunk, ls.RepairReport):
        assert (typed.__doc__ or "").strip()
    assert set(store.stats()) == set(ls.StoreStats.__annotations__)
    assert set(store.gc()) == set(ls.GcReport.__annotations__)
    assert set(store.fsck()) == set(ls.FsckReport.__annotations__)
