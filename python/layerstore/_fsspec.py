"""An fsspec filesystem over the images of a store: ``layerstore://TAG/path``, read-only.

Registered through the ``fsspec.specs`` entry point under the protocol ``layerstore`` (``oci`` is
taken), so that ``fsspec.open("layerstore://app:1/etc/os-release", store="path/to/store")`` and
``pandas.read_csv("layerstore://app:1/data.csv", storage_options={"store": ...})`` work without
an import. The first path component is the image (a tag, or a digest the CLI accepts); the rest
is a path in its union view. ``ls``, ``info``, ``cat``, ``open``, ``glob``, ``walk`` and ``find``
give what the materialized image holds. A symlink is reported with ``islink`` and the type of
what it points at when that is a file; a symlink to a directory is ``"other"`` (not entered, so
links such as Debian's ``/usr/bin/X11 -> .`` cannot make a walk endless).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

from fsspec.spec import AbstractFileSystem  # type: ignore[import-untyped]

import layerstore as ls

__all__ = ["LayerstoreFileSystem"]

_TYPES = {"dir": "directory", "file": "file", "hardlink": "file"}


class LayerstoreFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """Read-only fsspec filesystem of a store's images (protocol ``layerstore``).

    `store` is a :class:`layerstore.Store` or its directory (default: the CLI's store,
    ``$LAYERSTORE_HOME`` or the XDG data directory).
    """

    protocol = "layerstore"
    root_marker = ""

    def __init__(self, store: ls.Store | str | os.PathLike[str] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if not isinstance(store, ls.Store):
            from layerstore._clistore import default_store_dir, open_store

            store = open_store(Path(store) if store is not None else default_store_dir())
        self.store = store
        self._images: dict[str, ls.Stack] = {}

    @classmethod
    def _strip_protocol(cls, path: str | list[str]) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("layerstore://"):
            path = path[len("layerstore://") :]
        return path.strip("/")

    def _image(self, name: str) -> ls.Stack:
        if name not in self._images:
            from layerstore._clistore import CliError, resolve_image

            try:
                self._images[name] = resolve_image(self.store, name)
            except (CliError, ls.NotFoundError) as e:
                raise FileNotFoundError(2, f"no image {name!r} in the store ({e})", name) from None
        return self._images[name]

    def _split(self, path: str) -> tuple[str, str]:
        path = self._strip_protocol(path)
        name, _, inner = path.partition("/")
        return name, "/" + inner

    def _info(self, name: str, inner: str, st: ls.Stat) -> dict[str, Any]:
        kind = _TYPES.get(st.kind, "other")
        info: dict[str, Any] = {
            "name": name + ("" if inner == "/" else inner),
            "size": st.size if kind == "file" else 0,
            "type": kind,
            "mode": st.st_mode,
            "uid": st.uid,
            "gid": st.gid,
            "mtime": st.mtime_ns / 1e9,
            "islink": False,
        }
        if st.kind == "symlink":
            info["islink"] = True
            info["destination"] = st.linkname
            target = self._image(name).stat_many([inner])[0]
            if target is not None and target.kind == "file":
                info.update(type="file", size=target.size)
        return info

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """The entries of a directory of an image (the tags, at the root)."""
        name, inner = self._split(path)
        if not name:
            tags = sorted(self.store.images())
            found = [{"name": t, "size": 0, "type": "directory"} for t in tags]
            return found if detail else tags
        image = self._image(name)
        st = image.stat(inner, follow_symlinks=False)
        if st.kind != "dir":
            entries = [self._info(name, inner, st)]
        else:
            paths = [posixpath.join(inner, n) for n in image.listdir(inner)]
            stats = image.stat_many(paths, follow_symlinks=False)
            entries = [self._info(name, p, s) for p, s in zip(paths, stats, strict=True) if s]
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """What ``ls(detail=True)`` says of one path (FileNotFoundError if missing)."""
        name, inner = self._split(path)
        if not name:
            return {"name": "", "size": 0, "type": "directory"}
        if inner == "/":
            self._image(name)
            return {"name": name, "size": 0, "type": "directory"}
        st = self._image(name).stat(inner, follow_symlinks=False)
        return self._info(name, inner, st)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if mode != "rb":
            raise ValueError(f"layerstore images are read-only: mode {mode!r} is not supported")
        name, inner = self._split(path)
        return self._image(name).open(inner)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        """The bytes of a file (or of ``start:end`` of it)."""
        name, inner = self._split(path)
        image = self._image(name)
        if start is None and end is None:
            return image.read_bytes(inner)
        with image.open(inner) as f:
            size = image.stat(inner).size
            begin = 0 if start is None else (start if start >= 0 else max(size + start, 0))
            stop = size if end is None else (end if end >= 0 else max(size + end, 0))
            f.seek(begin)
            return f.read(max(stop - begin, 0))

    def ukey(self, path: str) -> str:
        """A key that changes when the content does: the file's content digest."""
        name, inner = self._split(path)
        return self._image(name).stat(inner).digest or self._image(name).chain_id
