"""File objects and pathlib-like paths over a stack's union view (thin wrappers of the core)."""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, overload

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
    """A read-only, pathlib-like path inside a stack (`image.path("/etc") / "os-release"`).

    It is an ``importlib.resources.abc.Traversable`` (iterdir, read_bytes, read_text, is_dir,
    is_file, joinpath, ``/``, open, name), so ``importlib.resources.as_file`` and code written
    for package resources take it.
    """

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
        """The last component of the path."""
        return posixpath.basename(self._path)

    @property
    def suffix(self) -> str:
        """The final suffix of the name ('.conf'), or ''."""
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> StackPath:
        """The directory holding this path (the root is its own parent)."""
        return StackPath(self._stack, posixpath.dirname(self._path))

    @property
    def parts(self) -> tuple[str, ...]:
        """'/' and the components of the path."""
        return ("/", *[p for p in self._path.split("/") if p])

    def joinpath(self, *others: str) -> StackPath:
        """This path with `others` appended, as ``/`` does."""
        path = self
        for o in others:
            path = path / o
        return path

    def stat(self, *, follow_symlinks: bool = True) -> Stat:
        """The entry at this path (symlinks followed unless `follow_symlinks` is False)."""
        return self._stack.stat(self._path, follow_symlinks=follow_symlinks)

    def lstat(self) -> Stat:
        """The entry at this path itself, a symlink not followed."""
        return self._stack.stat(self._path, follow_symlinks=False)

    def exists(self, *, follow_symlinks: bool = True) -> bool:
        """Whether something is at this path."""
        return self._stack.exists(self._path, follow_symlinks=follow_symlinks)

    def _kind(self, follow: bool = True) -> str | None:
        found = self._stack.stat_many([self._path], follow_symlinks=follow)[0]
        return None if found is None else found.kind

    def is_dir(self) -> bool:
        """Whether this path is a directory (symlinks followed)."""
        return self._kind() == "dir"

    def is_file(self) -> bool:
        """Whether this path is a regular file (symlinks followed)."""
        return self._kind() == "file"

    def is_symlink(self) -> bool:
        """Whether this path is a symlink."""
        return self._kind(follow=False) == "symlink"

    def iterdir(self) -> Iterator[StackPath]:
        """The paths of the directory's entries."""
        for name in self._stack.listdir(self._path):
            yield self / name

    def read_bytes(self) -> bytes:
        """The file's content."""
        return self._stack.read_bytes(self._path)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The file's content, decoded."""
        return self.read_bytes().decode(encoding, errors)

    def readlink(self) -> StackPath:
        """The symlink's target, as a path in the same stack."""
        return StackPath(
            self._stack, posixpath.join(self.parent._path, self._stack.readlink(self._path))
        )

    @overload
    def open(
        self,
        mode: Literal["r"] = "r",
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> io.TextIOWrapper: ...
    @overload
    def open(self, mode: Literal["rb"]) -> io.BufferedReader: ...
    def open(
        self,
        mode: str = "r",
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> io.BufferedReader | io.TextIOWrapper:
        """Open the file for reading: text with mode "r" (the default, as pathlib and
        ``importlib.resources.abc.Traversable`` have it; UTF-8 unless `encoding` says otherwise),
        binary with "rb". A stack is read-only: other modes raise ValueError."""
        if mode not in ("r", "rb"):
            raise ValueError(f"a stack is read-only: mode {mode!r} is not supported ('r', 'rb')")
        binary = self._stack.open(self._path)
        if mode == "rb":
            return binary
        return io.TextIOWrapper(
            binary, encoding=encoding or "utf-8", errors=errors, newline=newline
        )
