"""``COPY`` and ``ADD`` for the builder: sources from a context, writes under a container root.

Every destination path is resolved inside the root as the container would see it (symlinks in
the image followed relative to the root, never out of it), and files are created with
``O_NOFOLLOW``, so an image cannot redirect a copy onto the host. Sources are regular files,
directories (their contents are copied, as docker does) and symlinks (kept as links inside a
copied directory; followed when named directly). Modes and mtimes are kept, owners become
``--chown``'s (root by default), ``--chmod`` replaces modes. ``ADD`` of a local tar archive
(plain, gzip, bzip2, xz) extracts it through the store's safe ``apply``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from layerstore._dockerfile import DockerIgnore

__all__ = ["CopySource", "Owner", "copy_into", "resolve_in_root", "source_digest", "sources"]

_MAX_LINKS = 40


@dataclass(frozen=True)
class Owner:
    """The owner and mode ``--chown``/``--chmod`` give copied entries (None: keep / root)."""

    uid: int = 0
    gid: int = 0
    mode: int | None = None


@dataclass(frozen=True)
class CopySource:
    """One source of a ``COPY``/``ADD``: its path on the host and its name in the context."""

    path: Path
    name: str


def resolve_in_root(root: Path, path: str) -> Path:
    """``path`` (absolute in the container) resolved under ``root``, following symlinks as the
    container would: ``..`` and absolute link targets stop at ``root``. The last component is
    followed too when it is a link; missing components are kept as they are."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > _MAX_LINKS:
                raise OSError(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def sources(
    context: Path, patterns: list[str], ignore: DockerIgnore, *, line: int
) -> list[CopySource]:
    """The context paths ``patterns`` name (wildcards expanded, ``.dockerignore`` applied).
    A pattern that matches nothing raises ``FileNotFoundError``."""
    found: list[CopySource] = []
    root = context.resolve()
    for pattern in patterns:
        clean = os.path.normpath("/" + pattern).lstrip("/")
        if any(ch in clean for ch in "*?["):
            names = sorted(n for n in _context_names(root, ignore) if fnmatch.fnmatchcase(n, clean))
        elif clean in ("", ".") or not ignore.excluded(clean):
            names = [clean] if (root / clean).exists() or (root / clean).is_symlink() else []
        else:
            names = []
        if not names:
            raise FileNotFoundError(f"line {line}: {pattern}: no such file in the build context")
        found += [CopySource(root / n if n not in ("", ".") else root, n) for n in names]
    return found


def _context_names(root: Path, ignore: DockerIgnore) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            path = name if rel == "." else f"{rel}/{name}"
            if not ignore.excluded(path):
                yield path


def _walk(src: Path, name: str, ignore: DockerIgnore) -> Iterator[tuple[Path, str]]:
    """(host path, path relative to the source) of a directory's kept entries, parents first."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        dirnames.sort()
        for entry in sorted(dirnames + filenames):
            relpath = entry if rel == "." else f"{rel}/{entry}"
            ctx = relpath if name in ("", ".") else f"{name}/{relpath}"
            if ignore.excluded(ctx):
                if entry in dirnames:
                    dirnames.remove(entry)
                continue
            yield Path(dirpath) / entry, relpath


def source_digest(srcs: list[CopySource], ignore: DockerIgnore) -> str:
    """A sha256 over the sources' names, kinds, modes, mtimes, link targets and contents: the
    build cache's key for a ``COPY``/``ADD``."""
    h = hashlib.sha256()

    def add(path: Path, name: str) -> None:
        st = path.lstat()
        h.update(f"{name}\0{st.st_mode:o}\0{st.st_mtime_ns}\0{st.st_size}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.fsencode(os.readlink(path)))
        elif stat.S_ISREG(st.st_mode):
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)

    for src in srcs:
        real = src.path.resolve()
        add(real, src.name)
        if real.is_dir():
            for path, rel in _walk(real, src.name, ignore):
                add(path, f"{src.name}/{rel}")
    return "sha256:" + h.hexdigest()


def _make_parents(root: Path, path: str, owner: Owner) -> Path:
    """Create the missing directories of the container path ``path`` (root-owned 0755, or
    ``--chown``'s owner as docker gives it); returns its host path."""
    target = resolve_in_root(root, path)
    missing = []
    probe = target
    while not probe.exists() and probe != root:
        missing.append(probe)
        probe = probe.parent
    for p in reversed(missing):
        p.mkdir(mode=0o755)
        os.chmod(p, 0o755)
        os.chown(p, owner.uid, owner.gid)
    return target


def _copy_entry(src: Path, dest: Path, owner: Owner, *, follow: bool) -> None:
    st = src.stat() if follow else src.lstat()
    mode = stat.S_IMODE(st.st_mode) if owner.mode is None else owner.mode
    if stat.S_ISDIR(st.st_mode):
        if not dest.is_dir() or dest.is_symlink():
            if dest.exists() or dest.is_symlink():
                dest.unlink()
            dest.mkdir()
    elif stat.S_ISLNK(st.st_mode):
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        os.symlink(os.readlink(src), dest)
        os.lchown(dest, owner.uid, owner.gid)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return
    elif stat.S_ISREG(st.st_mode):
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            dest.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = os.open(dest, flags, 0o600)
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            while block := inp.read(1 << 20):
                out.write(block)
    else:
        raise OSError(f"{src}: only files, directories and symlinks can be copied")
    os.chown(dest, owner.uid, owner.gid)
    os.chmod(dest, mode)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))


def _is_archive(path: Path) -> bool:
    return path.is_file() and tarfile.is_tarfile(path)


def copy_into(
    root: Path,
    srcs: list[CopySource],
    dest: str,
    owner: Owner,
    ignore: DockerIgnore,
    *,
    extract: Callable[[Path, Path], object] | None = None,
) -> None:
    """Copy ``srcs`` to the container path ``dest`` (absolute) under ``root``, as ``COPY``
    does: into ``dest`` when it ends with ``/``, is a directory, or there are several sources;
    else as ``dest`` itself. With ``extract`` (``ADD``), a tar archive source is unpacked into
    the destination directory by ``extract(archive, directory)``."""
    into_dir = dest.endswith("/") or len(srcs) > 1 or resolve_in_root(root, dest).is_dir()
    for src in srcs:
        real = src.path.resolve()
        if real.is_dir() or (extract is not None and _is_archive(real)):
            target = _make_parents(root, dest, owner)
            if real.is_dir():
                dirs = []  # the destination itself keeps its new time, as buildah's does
                for path, rel in _walk(real, src.name, ignore):
                    copied = resolve_in_root(root, f"{dest}/{rel}")
                    _copy_entry(path, copied, owner, follow=False)
                    if path.is_dir() and not path.is_symlink():
                        dirs.append((path, copied))
                # Directories get their source's times once their contents are in place.
                for path, copied in reversed(dirs):
                    st = path.stat()
                    os.utime(copied, ns=(st.st_atime_ns, st.st_mtime_ns))
            else:
                assert extract is not None
                extract(real, target)
            continue
        name = f"{dest.rstrip('/')}/{Path(src.name).name}" if into_dir else dest
        parent = _make_parents(root, os.path.dirname(name) or "/", owner)
        _copy_entry(real, parent / os.path.basename(name), owner, follow=True)
