"""Several processes sharing one store (issue 14, section 6): creating the same new store at the
same moment is race-free."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import layerstore as ls
import tarfixtures as tf

CREATOR = """
import os, sys
import layerstore as ls
while not os.path.exists(sys.argv[2]):
    pass
store = ls.Store(sys.argv[1])
layer = store.import_tar(bytes.fromhex(sys.argv[3]))
print(layer.diff_id, flush=True)
"""


def test_processes_creating_the_same_new_store_at_once_all_succeed(tmp_path: Path) -> None:
    for round_ in range(6):
        root = tmp_path / f"store-{round_}"
        go = tmp_path / f"go-{round_}"
        tars = [tf.simple_tar({f"p{i}": tf.text_bytes(f"{round_}-{i}", 5000)}) for i in range(10)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CREATOR, str(root), str(go), data.hex()],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for data in tars
        ]
        time.sleep(0.5)  # every child is waiting for the signal
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err), data in zip(procs, outs, tars, strict=True):
            assert p.returncode == 0, err
            assert out.strip() == tf.sha256(data)
        store = ls.Store(root)
        assert len(store.layers()) == 10
        assert store.fsck()["ok"]
