"""The README's Python snippets run as written, in order, in a scratch directory (they make
their own data); and the README's claims about the command line hold."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippets_run_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2
    monkeypatch.chdir(os.getcwd())  # the snippet changes directory; put it back afterwards
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert Path("srv-rootfs/etc/os-release").read_bytes() == b"ID=demo\n"
