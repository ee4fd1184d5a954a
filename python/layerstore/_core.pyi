"""Type stubs of the compiled core (checked against the module by mypy.stubtest)."""

import os
from collections.abc import Callable
from typing import IO, Any, final

__all__ = ["FORMAT_VERSION", "Entry", "Layer", "Limits", "Store", "__version__"]

__version__: str
FORMAT_VERSION: int

StrPath = str | os.PathLike[str]
Source = StrPath | bytes | IO[bytes]
Progress = Callable[[int], object]

@final
class Limits:
    max_bytes: int
    max_entries: int
    max_record: int
    max_path_depth: int
    max_trailing: int
    def __new__(
        cls,
        *,
        max_bytes: int | None = None,
        max_entries: int | None = None,
        max_record: int | None = None,
        max_path_depth: int | None = None,
        max_trailing: int | None = None,
    ) -> Limits: ...

@final
class Entry:
    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def typeflag(self) -> str: ...
    @property
    def mode(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def uname(self) -> str: ...
    @property
    def gname(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...
    @property
    def linkname(self) -> str | None: ...
    @property
    def devmajor(self) -> int: ...
    @property
    def devminor(self) -> int: ...
    @property
    def rdev(self) -> int: ...
    @property
    def xattrs(self) -> dict[str, bytes]: ...
    @property
    def digest(self) -> str | None: ...
    @property
    def chunk_count(self) -> int: ...
    @property
    def sparse(self) -> bool: ...

@final
class Layer:
    @property
    def id(self) -> str: ...
    @property
    def diff_id(self) -> str: ...
    @property
    def tree_id(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def entry_count(self) -> int: ...
    @property
    def compressed_digest(self) -> str | None: ...
    @property
    def compression(self) -> str | None: ...
    @property
    def created(self) -> int: ...
    @property
    def import_timings(self) -> dict[str, float] | None: ...
    def entries(self) -> list[Entry]: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Store:
    def __new__(
        cls,
        path: StrPath,
        *,
        compression_level: int = 1,
        chunk_min: int | None = None,
        chunk_avg: int | None = None,
        chunk_max: int | None = None,
        max_depth: int = 127,
        limits: Limits | None = None,
    ) -> Store: ...
    @property
    def path(self) -> str: ...
    @property
    def settings(self) -> dict[str, int]: ...
    def import_tar(
        self,
        src: Source,
        /,
        *,
        expected_diff_id: str | None = None,
        expected_digest: str | None = None,
        limits: Limits | None = None,
        progress: Progress | None = None,
    ) -> Layer: ...
    def import_dir(
        self,
        path: StrPath,
        /,
        *,
        exclude_xattrs: list[str] = ...,
        expected_diff_id: str | None = None,
        limits: Limits | None = None,
        progress: Progress | None = None,
        max_threads: int | None = None,
    ) -> Layer: ...
    def export_tar(
        self,
        layer: Layer | str,
        dest: StrPath | IO[bytes],
        /,
        *,
        compression: str | None = None,
        progress: Progress | None = None,
    ) -> str: ...
    def layers(self) -> list[Layer]: ...
    def layer(self, key: Layer | str) -> Layer: ...
    def delete(self, layer: Layer | str) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def gc(self) -> dict[str, Any]: ...
    def fsck(self) -> dict[str, Any]: ...
