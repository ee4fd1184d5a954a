"""Memory that does not grow with a layer's bytes (issue 14, section 4): the peak RSS of an
import of a tar of many small files, measured in a child process (VmHWM), with the tar
generated as it streams in (nothing on disk).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from storeutil import run_python

MiB = 1 << 20

# A tar of N one-line files in directories of 1,000, written header by header as it is read.
IMPORT_MANY = r"""
import io, sys
import layerstore as ls

def header(name, size, typeflag=b"0", mode=0o644):
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"14000000000\0"
    h[148:156] = b"        "
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)

class ManyFiles(io.RawIOBase):
    def __init__(self, n):
        self.n, self.i, self.buf, self.done = n, 0, bytearray(), False
    def readable(self):
        return True
    def readinto(self, b):
        while len(self.buf) < len(b) and not self.done:
            i = self.i
            if i == self.n:
                self.buf += bytes(1024)
                self.done = True
                break
            if i % 1000 == 0:
                self.buf += header(b"d%d/" % (i // 1000), 0, b"5", 0o755)
            data = b"file %d\n" % i
            self.buf += header(b"d%d/f%d" % (i // 1000, i % 1000), len(data))
            self.buf += data + bytes(512 - len(data))
            self.i += 1
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        del self.buf[:n]
        return n

n = int(sys.argv[2])
layer = ls.Store(sys.argv[1]).import_tar(io.BufferedReader(ManyFiles(n), 1 << 20))
assert layer.entry_count == n + (n + 999) // 1000
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")]
print(int(hwm[0].split()[1]) * 1024)
"""


@pytest.mark.slow
def test_importing_many_small_files_keeps_no_copy_of_their_headers(tmp_path: Path) -> None:
    """100,000 files: the import's peak stays under 192 MiB. (It was 417 MiB: the splitter kept
    every header and padding block, ~1 KiB a file, in one growing buffer, and the stored blobs
    were encoded whole before being compressed.)"""
    res = run_python(IMPORT_MANY, str(tmp_path / "store"), "100000")
    assert res.returncode == 0, res.stderr
    peak = int(res.stdout.split()[-1])
    print(f"import of 100,000 files: VmHWM {peak / MiB:.0f} MiB", file=sys.stderr)
    assert peak < 192 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
