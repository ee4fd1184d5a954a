"""File objects and pathlib-like paths over a stack's union view (thin wrappers of the core)."""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from layerstore._core import ContentFile, Stack, Stat


class _RawStackFile(io.RawIOBase):
    """A seekable raw reader over one regular file of a stack: each read fetches only the chunks
    it covers (positional reads, so several file objects of one file never interfere)."""

    def __init__(self, content: ContentFile) -> None:
        super().__init__()
        self._content = content
        self._size = content.size
        self._pos = 0
        self.name = content.name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._content.pread(len(view), self._pos)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(22, "Invalid argument: negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def _clean(path: str) -> str:
    """Absolute, without empty or '.' components; '..' is kept: the stack resolves it, since
    collapsing it as text would be wrong after a symlink."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/" + "/".join(parts)


def walk(
    stack: Stack, top: str | bytes | os.PathLike[str] = "/"
) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk` over a stack: top-down, sorted, prunable, symlinks to directories listed but not
    entered. A missing `top` yields nothing, as os.walk does."""
    start = _clean(os.fsdecode(top))
    pending = [start]
    while pending:
        here = pending.pop()
        try:
            children = stack._scandir(here)
        except OSError:
            continue
        dirs = [name for name, is_dir, _ in children if is_dir]
        files = [name for name, is_dir, _ in children if not is_dir]
        yield here, dirs, files
        links = {name for name, _, is_link in children if is_link}
        pending.extend(posixpath.join(here, d) for d in reversed(dirs) if d not in links)


def open_file(content: ContentFile) -> io.BufferedReader:
    """The object `Stack.open()` returns: a buffered, seekable, read-only binary file."""
    return io.BufferedReader(_RawStackFile(content), buffer_size=256 * 1024)


class StackPath:
    """A read-only, pathlib-like path inside a stack (`image.path("/etc") / "os-release"`)."""

    __slots__ = ("_path", "_stack")

    def __init__(self, stack: Stack, path: str | bytes | os.PathLike[str] = "/") -> None:
        self._stack = stack
        self._path = _clean(os.fsdecode(path))

    def __truediv__(self, other: str | os.PathLike[str]) -> StackPath:
        return StackPath(self._stack, posixpath.join(self._path, os.fsdecode(other)))

    def __fspath__(self) -> str:
        return self._path

    def __str__(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"StackPath({self._path!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StackPath)
            and other._stack is self._stack
            and other._path == self._path
        )

    def __hash__(self) -> int:
        return hash((id(self._stack), self._path))

    @property
    def name(self) -> str:
        """The last path component."""
        return posixpath.basename(self._path)

    @property
    def suffix(self) -> str:
        """The file extension of the last component (with its dot), or ""."""
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> StackPath:
        """The path one level up."""
        return StackPath(self._stack, posixpath.dirname(self._path))

    @property
    def parts(self) -> tuple[str, ...]:
        """The path's components, "/" first."""
        return ("/", *[p for p in self._path.split("/") if p])

    def joinpath(self, *others: str) -> StackPath:
        """This path with `other` parts appended."""
        path = self
        for o in others:
            path = path / o
        return path

    def stat(self, *, follow_symlinks: bool = True) -> Stat:
        """The entry at this path (symlinks followed unless `follow_symlinks=False`)."""
        return self._stack.stat(self._path, follow_symlinks=follow_symlinks)

    def lstat(self) -> Stat:
        """The entry at this path, symlinks not followed."""
        return self._stack.stat(self._path, follow_symlinks=False)

    def exists(self, *, follow_symlinks: bool = True) -> bool:
        """Whether the path exists in the image."""
        return self._stack.exists(self._path, follow_symlinks=follow_symlinks)

    def _kind(self, follow: bool = True) -> str | None:
        found = self._stack.stat_many([self._path], follow_symlinks=follow)[0]
        return None if found is None else found.kind

    def is_dir(self) -> bool:
        """Whether the path is a directory (symlinks followed)."""
        return self._kind() == "dir"

    def is_file(self) -> bool:
        """Whether the path is a regular file (symlinks followed)."""
        return self._kind() == "file"

    def is_symlink(self) -> bool:
        """Whether the path is a symbolic link."""
        return self._kind(follow=False) == "symlink"

    def iterdir(self) -> Iterator[StackPath]:
        """The children of this directory, sorted."""
        for name in self._stack.listdir(self._path):
            yield self / name

    def read_bytes(self) -> bytes:
        """The whole content of the file (each chunk verified)."""
        return self._stack.read_bytes(self._path)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The content of the file, decoded."""
        return self.read_bytes().decode(encoding, errors)

    def readlink(self) -> StackPath:
        """The target of this symlink, as a path."""
        return StackPath(
            self._stack, posixpath.join(self.parent._path, self._stack.readlink(self._path))
        )

    def open(self, mode: str = "rb") -> io.BufferedReader:
        """A file object reading the file (binary, or text with "r")."""
        if mode not in ("r", "rb"):
            raise ValueError(f"a stack is read-only: mode {mode!r} is not supported (use 'rb')")
        if mode == "r":
            raise ValueError(
                "open the file in binary mode ('rb') and decode it, or use read_text()"
            )
        return self._stack.open(self._path)
