"""Type stubs of the compiled core (checked against the module by mypy.stubtest)."""

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from io import BufferedReader
from typing import IO, Any, final

from layerstore._analysis import Analysis, Comparison
from layerstore._container import Container
from layerstore._stackio import StackPath
from layerstore._types import BlobInfo, FsckReport, GcReport, MountInfo, StoreStats

__all__ = [
    "FORMAT_VERSION",
    "ContentFile",
    "Entry",
    "Layer",
    "Limits",
    "Mount",
    "RawContainer",
    "Stack",
    "Stat",
    "Store",
    "__version__",
    "registry_login",
    "registry_logout",
]

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
    def created_by(self) -> str | None: ...
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
    def blobs(self) -> list[BlobInfo]: ...
    def entries(self) -> list[Entry]: ...
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Store:
    def __new__(
        cls,
        path: StrPath,
        *,
        compression_level: int = 3,
        chunk_min: int | None = None,
        chunk_avg: int | None = None,
        chunk_max: int | None = None,
        max_depth: int = 127,
        limits: Limits | None = None,
        readonly: bool = False,
    ) -> Store: ...
    @property
    def readonly(self) -> bool:
        """Whether the store is open read-only (asked for, or its files cannot be written)."""
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
    def stats(self) -> StoreStats:
        """Logical and stored bytes, chunks, packs and the dedup ratio."""
    def stack(self, layers: Sequence[Layer | str]) -> Stack: ...
    def tag(self, image: Stack, name: str) -> None: ...
    def get(self, name: str) -> Stack: ...
    def images(self) -> dict[str, Stack]: ...
    def untag(self, name: str) -> None: ...
    def analyze(self, image: Stack, /, *, files: bool = False) -> Analysis: ...
    def compare(self, a: Stack, b: Stack) -> Comparison: ...
    def import_oci(
        self,
        src: StrPath,
        /,
        *,
        platform: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Stack]: ...
    def export_oci(
        self,
        image: Stack,
        dest: StrPath,
        /,
        *,
        tag: str | None = None,
        compression: str | None = None,
        progress: Progress | None = None,
    ) -> str: ...
    def oci_blob(self, digest: str) -> tuple[str, bytes]:
        """The manifest or config `digest` recorded for an image (``image.digest``,
        ``image.config_digest``), byte for byte: (media type, data)."""
    def import_docker_archive(
        self, src: StrPath, /, *, progress: Progress | None = None
    ) -> dict[str, Stack]: ...
    def pull(
        self,
        reference: str,
        /,
        *,
        platform: str | None = None,
        auth: tuple[str, str] | None = None,
        tls_verify: bool = True,
        ca_file: StrPath | None = None,
        progress: Progress | None = None,
    ) -> Stack:
        """Pull image `reference` (``host[:port]/repo[:tag][@digest]``; a bare ``repo:tag`` is
        on Docker Hub) and tag it with its canonical name (``docker.io/library/debian:12``).

        `platform` (``"linux/arm64"``) picks from an index (default: this machine's); `auth` is
        ``(user, password)`` (default: the auth files podman and docker write); ``tls_verify=False``
        also allows plain HTTP. Layers the store holds are not downloaded; of a zstd:chunked
        layer (see `push`) only the chunks the store lacks are fetched, with range requests
        (a registry without range support gets a plain pull). Every blob is size- and
        digest-checked, and a failure leaves nothing stored or tagged. Raises
        ``NotFoundError`` (unknown image or platform), ``PermissionError`` (401/403),
        ``IntegrityError`` (a blob that is not what the manifest says), ``OSError`` (network).
        """
    def push(
        self,
        image: Stack,
        reference: str,
        /,
        *,
        compression: str | None = "gzip",
        auth: tuple[str, str] | None = None,
        tls_verify: bool = True,
        ca_file: StrPath | None = None,
        progress: Progress | None = None,
    ) -> str:
        """Push `image` to the registry as `reference`; returns the manifest digest.

        Blobs the registry already has are not sent; an imported or pulled image keeps its
        manifest and blob digests when its layers already use `compression` (``None`` keeps
        whatever they use); other layers are compressed deterministically. `compression` is
        ``"gzip"``, ``"zstd"``, ``"zstd:chunked"`` (containers/storage's seekable format, cut at
        the store's chunk boundaries: other stores pull only the chunks they lack) or
        ``"none"``. Errors as for `pull`.
        """
    def export_docker_archive(
        self,
        image: Stack,
        dest: StrPath,
        /,
        *,
        tag: str | None = None,
        format: str = "oci",
        progress: Progress | None = None,
    ) -> str: ...
    def gc(self) -> GcReport:
        """Remove what nothing references and compact packs that are mostly garbage."""
    def fsck(self, *, repair: bool = False) -> FsckReport:
        """Re-hash every chunk and check every reference.

        Returns ``ok``, ``problems``, ``garbage``, ``chunks_checked``, ``layers_checked``,
        ``damaged`` (each damaged chunk with its ``pack``, ``reason`` and ``used_by``: the
        (layer, path) pairs that need it), ``broken`` (layers marked broken) and ``repaired``.
        With ``repair=True``, damaged chunks are taken out of use and the layers using them are
        marked broken: every read of them raises ``IntegrityError`` until their content is
        imported again.
        """
    def broken_layers(self) -> dict[str, int]:
        """Layers marked broken by ``fsck(repair=True)``: layer id → damaged chunk count."""
    def materialize(
        self,
        image: Stack,
        dest: StrPath,
        /,
        *,
        max_threads: int | None = None,
        progress: Progress | None = None,
    ) -> dict[str, int]: ...
    def apply(
        self, layer: Layer | str, dest: StrPath, /, *, progress: Progress | None = None
    ) -> dict[str, int]: ...
    def diff(
        self,
        a: Stack | StrPath,
        b: Stack | StrPath,
        /,
        *,
        compare_content: bool = False,
        source_date_epoch: int | None = None,
        max_threads: int | None = None,
        progress: Progress | None = None,
    ) -> Layer: ...
    def changes(
        self,
        a: Stack | StrPath,
        b: Stack | StrPath,
        /,
        *,
        compare_content: bool = False,
        max_threads: int | None = None,
    ) -> list[tuple[str, str]]: ...
    def squash(
        self,
        image: Stack,
        /,
        start: int = 0,
        stop: int | None = None,
        *,
        dest: StrPath | None = None,
        source_date_epoch: int | None = None,
        progress: Progress | None = None,
    ) -> Layer: ...
    def squash_changes(
        self, image: Stack, /, start: int = 0, stop: int | None = None
    ) -> list[tuple[str, str]]: ...
    def mount(
        self,
        image: Stack,
        target: StrPath,
        /,
        *,
        writable: bool = False,
        backend: str = "auto",
    ) -> Mount:
        """Mount ``image`` at the empty directory ``target``.

        ``backend``: ``overlay`` (kernel overlayfs over layer snapshots that every mount
        shares; root), ``fuse`` (served straight from the store, nothing extracted; root or
        access to ``/dev/fuse``) or ``auto`` (overlay as root, else fuse). A writable mount
        keeps its changes in an upper directory of the store until ``Mount.commit()``.
        """
    def write_image(self, image: Stack, config: bytes, /, *, tag: str | None = None) -> Stack:
        """Record ``config`` (OCI image config JSON) as ``image``'s config, tagged ``tag``.

        The manifest lists the layers as uncompressed blobs (digest = ``diff_id``); no layer is
        read. The config's ``rootfs.diff_ids`` must be the image's.
        """
    def build(self, context: StrPath, dockerfile: StrPath | None = None, **kwargs: Any) -> Stack:
        """Build a Dockerfile: ``layerstore.build(store, context, dockerfile, **kwargs)``."""
    def mounts(self) -> list[MountInfo]:
        """The live mounts of this store (what dead processes left is cleaned up first)."""
    def unmount(
        self,
        target: StrPath,
        /,
        *,
        commit: bool = False,
        created_by: str | None = None,
        progress: Progress | None = None,
    ) -> Layer | None:
        """Unmount this store's mount at ``target`` (made by any process).

        With ``commit=True``, its changes are first stored as a layer, which is returned.
        """

PathArg = str | bytes | os.PathLike[str]

@final
class Stat:
    @property
    def path(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def mode(self) -> int: ...
    @property
    def st_mode(self) -> int: ...
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
    def layer(self) -> int | None: ...
    @property
    def implicit(self) -> bool: ...
    @property
    def digest(self) -> str | None: ...
    @property
    def hardlink(self) -> str | None: ...
    def is_dir(self) -> bool: ...
    def is_file(self) -> bool: ...
    def is_symlink(self) -> bool: ...

@final
class ContentFile:
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    def pread(self, n: int, offset: int) -> bytes: ...

@final
class Stack:
    @property
    def layers(self) -> list[Layer]: ...
    @property
    def chain_id(self) -> str: ...
    @property
    def digest(self) -> str | None: ...
    @property
    def config_digest(self) -> str | None: ...
    def __len__(self) -> int: ...
    def content_bytes(self) -> int: ...
    def push(self, layer: Layer | str) -> Stack: ...
    def stat(self, path: PathArg, /, *, follow_symlinks: bool = True) -> Stat: ...
    def stat_many(
        self, paths: Iterable[PathArg], /, *, follow_symlinks: bool = True
    ) -> list[Stat | None]: ...
    def exists(self, path: PathArg, /, *, follow_symlinks: bool = True) -> bool: ...
    def listdir(self, path: PathArg | None = None) -> list[str]: ...
    def walk(self, top: PathArg | None = None) -> Iterator[tuple[str, list[str], list[str]]]: ...
    def _scandir(self, path: PathArg) -> list[tuple[str, bool, bool]]: ...
    def readlink(self, path: PathArg) -> str: ...
    def read_bytes(self, path: PathArg) -> bytes: ...
    def open(self, path: PathArg) -> BufferedReader: ...
    def path(self, p: PathArg | None = None) -> StackPath: ...
    def _open_raw(self, path: PathArg) -> ContentFile: ...
    def provenance(self, path: PathArg) -> list[tuple[int, str]]: ...
    @staticmethod
    def index_nodes() -> int: ...
    def squash(
        self,
        start: int = 0,
        stop: int | None = None,
        *,
        source_date_epoch: int | None = None,
        progress: Progress | None = None,
    ) -> Stack: ...
    def container(self) -> Container: ...
    def run(self, argv: Sequence[str] | None = None, **kwargs: Any) -> int | tuple[int, Layer]:
        """Run ``argv`` in a container of this image (``layerstore.run(store, image, argv)``)."""

@final
class RawContainer:
    def write_at(self, path: PathArg, offset: int, data: bytes, /, create: bool = False) -> int: ...
    def write_bytes(self, path: PathArg, data: bytes) -> None: ...
    def truncate(self, path: PathArg, size: int) -> None: ...
    def mkdir(
        self, path: PathArg, /, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False
    ) -> None: ...
    def remove(self, path: PathArg, /, *, recursive: bool = False) -> None: ...
    def rename(self, src: PathArg, dst: PathArg) -> None: ...
    def symlink(self, target: PathArg, path: PathArg) -> None: ...
    def link(self, src: PathArg, dst: PathArg) -> None: ...
    def chmod(self, path: PathArg, mode: int, /, *, follow_symlinks: bool = True) -> None: ...
    def chown(
        self, path: PathArg, uid: int, gid: int, /, *, follow_symlinks: bool = True
    ) -> None: ...
    def utime(
        self, path: PathArg, /, mtime_ns: int | None = None, *, follow_symlinks: bool = True
    ) -> None: ...
    def setxattr(self, path: PathArg, name: str, value: bytes) -> None: ...
    def removexattr(self, path: PathArg, name: str) -> None: ...
    @property
    def hashed_bytes(self) -> int: ...
    def view(self) -> Stack: ...
    def commit(
        self, *, created_by: str | None = None, progress: Progress | None = None
    ) -> Layer: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...

@final
class Mount:
    """A live mount of an image: a context manager that unmounts on exit."""

    @property
    def path(self) -> str:
        """Where the image is mounted."""
    @property
    def backend(self) -> str:
        """``overlay`` or ``fuse``."""
    @property
    def writable(self) -> bool:
        """Whether writes through the mount are allowed (and can be committed)."""
    @property
    def image(self) -> Stack:
        """The image mounted."""
    @property
    def mounted(self) -> bool:
        """Whether the mount is still in place."""
    def commit(self, *, created_by: str | None = None, progress: Progress | None = None) -> Layer:
        """Store what was changed through this writable mount as a new layer.

        The image and the mount are unchanged; the cost follows what changed, and the layer
        equals ``store.diff(image, mount.path)``.
        """
    def unmount(self) -> None:
        """Unmount (uncommitted changes of a writable mount are discarded)."""
    def disown(self) -> MountInfo:
        """Let an overlay mount outlive this process (until ``Store.unmount(path)``)."""
    def wait(self) -> None:
        """Serve a FUSE mount until it is unmounted from outside, then clean up."""
    def __enter__(self) -> Mount: ...
    def __exit__(self, *args: object) -> bool: ...

def registry_login(
    registry: str,
    username: str,
    password: str,
    /,
    *,
    tls_verify: bool = True,
    ca_file: StrPath | None = None,
) -> str:
    """Check the credentials against `registry` (``host[:port]``), then record them in
    ``$REGISTRY_AUTH_FILE``, else ``$XDG_RUNTIME_DIR/containers/auth.json``, else
    ``~/.docker/config.json``; returns that file's path. Wrong credentials: ``PermissionError``."""

def registry_logout(registry: str) -> bool:
    """Forget the credentials of `registry` in every auth file; returns whether there were any."""
