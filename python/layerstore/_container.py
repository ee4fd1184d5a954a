"""Containers: a writable layer over an image (``Stack.container()``).

The edits run in the Rust core (``_core.RawContainer``); this module adds what is plain Python:
the read API (every read goes to a snapshot of the current view, so it sees the container's own
changes), binary file objects for ``open(path, "wb" | "r+b" | "ab")``, and the context manager.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from layerstore._args import checked_int

if TYPE_CHECKING:
    from layerstore._core import Layer, RawContainer, Stack, Stat
    from layerstore._stackio import StackPath

PathArg = str | bytes | os.PathLike[str]

#: Permission bits, setuid, setgid and sticky: the most a mode argument may hold.
MODE_MAX = 0o7777

# Writes reach the core in blocks of this size: each block re-cuts at most about two chunks
# around its edges, so large blocks keep sequential writes close to one hashing pass.
WRITE_BUFFER = 8 << 20


class _RawFile(io.RawIOBase):
    """Positional reads and writes on one regular file of a container."""

    def __init__(self, raw: RawContainer, path: PathArg, *, readable: bool, append: bool) -> None:
        super().__init__()
        self._raw = raw
        self._path = path
        self._readable = readable
        self._append = append
        self._pos = 0
        self.name = os.fsdecode(path)

    def readable(self) -> bool:
        return self._readable

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _size(self) -> int:
        return self._raw.view().stat(self._path).size

    def readinto(self, buffer: Any) -> int:
        if not self._readable:
            raise io.UnsupportedOperation("read")
        view = memoryview(buffer).cast("B")
        data = self._raw.view()._open_raw(self._path).pread(len(view), self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def write(self, b: Any) -> int:
        data = bytes(b)
        if self._append:
            self._pos = self._size()
        self._raw.write_at(self._path, self._pos, data)
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size() + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if pos < 0:
            raise OSError(22, "Invalid argument", self.name)
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        self._raw.truncate(self._path, size)
        return size


_MODES = {
    "rb": (True, False, False, False),  # readable, writable, create+truncate, append
    "wb": (False, True, True, False),
    "w+b": (True, True, True, False),
    "r+b": (True, True, False, False),
    "ab": (False, True, False, True),
    "a+b": (True, True, False, True),
}


class Container:
    """A writable layer over an image: edits never touch the image or other containers.

    Use as a context manager (``with image.container() as c:``); ``commit()`` stores the changes
    as a new layer. Writes copy on write at chunk level: changing one byte of a large file
    hashes and stores only the chunks around it (``hashed_bytes`` counts what writes hashed).
    """

    def __init__(self, raw: RawContainer) -> None:
        self._raw = raw

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Discard the writable layer (what was not committed is lost)."""
        self._raw.close()

    @property
    def closed(self) -> bool:
        """Whether the container was closed (its edits are gone; commits stay)."""
        return self._raw.closed

    @property
    def hashed_bytes(self) -> int:
        """Bytes hashed by writes so far (the copy-on-write cost)."""
        return self._raw.hashed_bytes

    def view(self) -> Stack:
        """A read-only snapshot of the current view (later edits do not show in it). It reads
        like an image but is none: tagging, pushing onto, squashing or diffing it raises
        ValueError (commit the container and push the layer instead)."""
        return self._raw.view()

    # Edits.

    def write_bytes(self, path: PathArg, data: bytes | bytearray | memoryview) -> None:
        """Replace the content of `path` (created, mode 0644, when missing)."""
        self._raw.write_bytes(path, bytes(data))

    def write_text(self, path: PathArg, text: str, encoding: str = "utf-8") -> None:
        """Write `text` (encoded) as the whole content of `path`."""
        self.write_bytes(path, text.encode(encoding))

    def truncate(self, path: PathArg, size: int) -> None:
        """Cut or extend (with zeros) the regular file `path` to `size` bytes."""
        self._raw.truncate(path, checked_int("size", size))

    def mkdir(
        self, path: PathArg, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False
    ) -> None:
        """Create a directory (and its parents with `parents`; an existing one is no error
        with `exist_ok`)."""
        mode = checked_int("mode", mode, maximum=MODE_MAX)
        self._raw.mkdir(path, mode, parents=parents, exist_ok=exist_ok)

    def remove(self, path: PathArg, *, recursive: bool = False) -> None:
        """Delete a file, symlink or (empty unless `recursive`) directory."""
        self._raw.remove(path, recursive=recursive)

    def rename(self, src: PathArg, dst: PathArg) -> None:
        """Move `src` to `dst` (replacing a file there, as ``os.rename`` does)."""
        self._raw.rename(src, dst)

    def symlink(self, target: PathArg, path: PathArg) -> None:
        """A symlink at `path` whose target is `target`, kept verbatim."""
        self._raw.symlink(target, path)

    def link(self, src: PathArg, dst: PathArg) -> None:
        """A hard link at `dst` to `src`."""
        self._raw.link(src, dst)

    def chmod(self, path: PathArg, mode: int, *, follow_symlinks: bool = True) -> None:
        """Set the permission bits (setuid, setgid and sticky included: at most 0o7777)."""
        mode = checked_int("mode", mode, maximum=MODE_MAX)
        self._raw.chmod(path, mode, follow_symlinks=follow_symlinks)

    def chown(self, path: PathArg, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """Set the numeric owner and group."""
        uid, gid = checked_int("uid", uid), checked_int("gid", gid)
        self._raw.chown(path, uid, gid, follow_symlinks=follow_symlinks)

    def utime(
        self, path: PathArg, mtime_ns: int | None = None, *, follow_symlinks: bool = True
    ) -> None:
        """Set the modification time (nanoseconds since the epoch; now when None)."""
        self._raw.utime(path, mtime_ns, follow_symlinks=follow_symlinks)

    def setxattr(self, path: PathArg, name: str, value: bytes) -> None:
        """Set extended attribute `name` of `path` to `value`."""
        self._raw.setxattr(path, name, value)

    def removexattr(self, path: PathArg, name: str) -> None:
        """Remove extended attribute `name` of `path`."""
        self._raw.removexattr(path, name)

    def open(self, path: PathArg, mode: str = "rb") -> BinaryIO:
        """A binary file object: "rb", "wb", "w+b", "r+b", "ab" or "a+b"."""
        if mode not in _MODES:
            raise ValueError(f"unsupported mode {mode!r} (binary modes only)")
        readable, writable, create, append = _MODES[mode]
        if not writable:
            return self.view().open(path)
        if create:
            self._raw.write_at(path, 0, b"", create=True)
            self._raw.truncate(path, 0)
        elif append:
            self._raw.write_at(path, 0, b"", create=True)
        else:
            self._raw.write_at(path, 0, b"")  # must exist (a no-op otherwise)
        raw = _RawFile(self._raw, path, readable=readable, append=append)
        buffered: io.BufferedIOBase
        if readable:
            buffered = io.BufferedRandom(raw, buffer_size=WRITE_BUFFER)
        else:
            buffered = io.BufferedWriter(raw, buffer_size=WRITE_BUFFER)
        return buffered

    def commit(self, *, created_by: str | None = None, progress: Any = None) -> Layer:
        """Store the container's changes as a new layer (the container stays usable);
        `created_by` records the build step (``layer.created_by``, OCI history)."""
        return self._raw.commit(created_by=created_by, progress=progress)

    # Reads, through a snapshot of the current view.

    def stat(self, path: PathArg, *, follow_symlinks: bool = True) -> Stat:
        """The entry at `path` as the container sees it (its own changes included)."""
        return self.view().stat(path, follow_symlinks=follow_symlinks)

    def stat_many(
        self, paths: Iterable[PathArg], *, follow_symlinks: bool = True
    ) -> list[Stat | None]:
        """``stat`` of many paths in one call; None for a missing one."""
        return self.view().stat_many(paths, follow_symlinks=follow_symlinks)

    def exists(self, path: PathArg, *, follow_symlinks: bool = True) -> bool:
        """Whether `path` exists in the container's view."""
        return self.view().exists(path, follow_symlinks=follow_symlinks)

    def listdir(self, path: PathArg = "/") -> list[str]:
        """The names in directory `path`, sorted."""
        return self.view().listdir(path)

    def walk(self, top: PathArg = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        """Like ``os.walk`` over the container's view."""
        return self.view().walk(top)

    def readlink(self, path: PathArg) -> str:
        """The target of symlink `path`."""
        return self.view().readlink(path)

    def read_bytes(self, path: PathArg) -> bytes:
        """The content of file `path`."""
        return self.view().read_bytes(path)

    def read_text(self, path: PathArg, encoding: str = "utf-8") -> str:
        """The content of file `path`, decoded."""
        return self.read_bytes(path).decode(encoding)

    def path(self, p: PathArg = "/") -> StackPath:
        """A pathlib-like read-only view of `p` in the container's current view."""
        return self.view().path(p)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<layerstore.Container {state}>"
