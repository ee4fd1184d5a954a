"""Images from a Dockerfile: :func:`build`, one layer per filesystem-changing instruction.

``RUN`` runs its command (:func:`layerstore._run.run_in`) in a writable mount of the stage's
image with the stage's environment (``ENV`` and ``ARG`` values), working directory (created if
missing, in ``RUN``'s layer, as buildah does), user and ``SHELL``; ``COPY`` and ``ADD`` write
into a writable mount. Each commits one layer. The other instructions change the config and
add an ``empty_layer`` history entry (``WORKDIR`` too: buildah 1.28 makes it no layer). The
history's ``created_by`` strings follow buildah's (``/bin/sh -c #(nop) ENV A=1``,
``/bin/sh -c make``).

Each layer-making step is looked up in the store's build cache first (see
:mod:`layerstore._buildstate`); a miss rebuilds from that step on. With ``SOURCE_DATE_EPOCH``
(the environment or ``source_date_epoch=``), layers are committed with mtimes clamped to it and
every date in the config is that instant, so two builds of one context give the same digests.

A failure (bad Dockerfile, missing context file, failing ``RUN``, ``KeyboardInterrupt``) leaves
no image tagged and no mount behind; layers already committed stay in the store (and cache).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerstore._buildcopy import Owner, copy_into, resolve_in_root, source_digest, sources
from layerstore._buildstate import BuildCache, rfc3339, step_key, write_image
from layerstore._dockerfile import (
    DockerfileError,
    DockerIgnore,
    Instruction,
    Stage,
    expand_word,
    expand_words,
    key_values,
    parse,
    stages,
)
from layerstore._errors import LayerstoreError
from layerstore._run import DEFAULT_PATH, RunError, image_config, resolve_user, run_in

if TYPE_CHECKING:
    from layerstore._core import Layer, Stack, Store

__all__ = ["BuildError", "build"]

_NOP = "/bin/sh -c #(nop) "
_DEFAULT_SHELL = ("/bin/sh", "-c")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)")
_UNITS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


class BuildError(LayerstoreError):
    """A build failed at a step: ``line`` is the Dockerfile line, ``status`` the exit status of
    a failing ``RUN`` (else None)."""

    def __init__(self, message: str, *, line: int = 0, status: int | None = None) -> None:
        super().__init__(message)
        self.line = line
        self.status = status


@dataclass
class _State:
    """A stage being built: its image and the config it will have."""

    image: Stack
    settings: dict[str, Any]
    history: list[dict[str, Any]]
    base_history: list[dict[str, Any]] | None
    base_layers: int
    args: dict[str, str] = field(default_factory=dict)
    shell: tuple[str, ...] = _DEFAULT_SHELL
    author: str | None = None

    @property
    def env(self) -> dict[str, str]:
        out = {}
        for item in self.settings.get("Env") or []:
            key, _, value = item.partition("=")
            out[key] = value
        return out

    def set_env(self, pairs: Mapping[str, str]) -> None:
        env = self.env | dict(pairs)
        self.settings["Env"] = [f"{k}={v}" for k, v in env.items()]

    @property
    def scope(self) -> dict[str, str]:
        """What substitution sees: the stage's ARGs, overridden by its ENV (docker's rule)."""
        return self.args | self.env


@dataclass
class _Build:
    store: Store
    context: Path
    ignore: DockerIgnore
    escape: str
    build_args: Mapping[str, str]
    global_args: dict[str, str]
    epoch: int | None
    cache: BuildCache
    say: Callable[[str], object]
    pull_options: Mapping[str, Any] = field(default_factory=dict)
    built: dict[int, _State] = field(default_factory=dict)
    stage_list: list[Stage] = field(default_factory=list)

    def now(self) -> str:
        return rfc3339(self.epoch if self.epoch is not None else time.time())


def _duration(text: str, line: int) -> int:
    total, pos = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _UNITS[m.group(2)])
        pos = m.end()
    if pos != len(text) or not text:
        raise DockerfileError(f"bad duration {text!r}", line)
    return total


def _command(ins: Instruction, shell: tuple[str, ...]) -> list[str]:
    return list(ins.json) if ins.json is not None else [*shell, ins.args]


@contextmanager
def _mounted(store: Store, image: Stack, *, writable: bool = True) -> Iterator[tuple[Any, Path]]:
    """A kernel overlay mount of ``image`` in a scratch directory: (the mount, its path)."""
    with tempfile.TemporaryDirectory(prefix="layerstore-build-") as scratch:
        target = Path(scratch) / "root"
        target.mkdir()
        with store.mount(image, target, writable=writable, backend="overlay") as mount:
            yield mount, target


def _commit(b: _Build, image: Stack, mount: Any, target: Path) -> Layer:
    if b.epoch is None:
        layer: Layer = mount.commit()
        return layer
    return b.store.diff(image, target, source_date_epoch=b.epoch)


def _base(b: _Build, name: str, line: int) -> _State:
    """The state a ``FROM name`` starts from: an earlier stage, ``scratch`` or a store image."""
    ref = expand_word(name, b.global_args, b.escape, line)
    for stage in b.stage_list:
        if stage.name == ref.lower() and stage.index in b.built:
            prev = b.built[stage.index]
            return _State(
                prev.image,
                json.loads(json.dumps(prev.settings)),
                [],
                prev.base_history + prev.history if prev.base_history is not None else None,
                len(prev.image.layers),
                shell=prev.shell,
            )
    if ref == "scratch":
        return _State(b.store.stack([]), {}, [], [], 0)
    image = _stored_or_pulled(b, ref, line)
    settings = image_config(b.store, image)
    history = None
    if image.config_digest is not None:
        _, data = b.store.oci_blob(image.config_digest)
        history = list(json.loads(data).get("history") or [])
    env = [e for e in settings.get("Env") or [] if e.startswith("PATH=")]
    if not env:
        settings["Env"] = [f"PATH={DEFAULT_PATH}", *(settings.get("Env") or [])]
    return _State(image, settings, [], history, len(image.layers))


def _stored_or_pulled(b: _Build, ref: str, line: int) -> Stack:
    """The store's image ``ref``; else ``ref`` pulled from its registry (``Store.pull`` with the
    build's ``pull_options``), as docker and buildah do for an image they lack."""
    try:
        return b.store.get(ref)
    except LookupError:
        pass
    b.say(f"--> pulling {ref}")
    try:
        return b.store.pull(ref, **b.pull_options)
    except (LayerstoreError, OSError, ValueError) as e:
        raise BuildError(
            f"line {line}: FROM {ref}: not in the store, and pulling it failed: {e}", line=line
        ) from e


def _record(b: _Build, st: _State, created_by: str, *, empty: bool) -> None:
    entry: dict[str, Any] = {"created": b.now(), "created_by": created_by}
    if empty:
        entry["empty_layer"] = True
    st.history.append(entry)


def _layer_step(b: _Build, st: _State, key: str, work: Callable[[Path], None]) -> None:
    """A layer-making step: the cached layer for ``key``, else ``work`` on a writable mount of
    the stage's image, committed."""
    layer_id = b.cache.layer(key)
    if layer_id is not None:
        b.say(f"--> using cache {layer_id}")
        st.image = st.image.push(layer_id)
        return
    with _mounted(b.store, st.image) as (mount, target):
        work(target)
        layer = _commit(b, st.image, mount, target)
    b.cache.put(key, layer.id)
    st.image = st.image.push(layer)


def _run_step(b: _Build, st: _State, ins: Instruction) -> None:
    argv = _command(ins, st.shell)
    env = {**st.args, **st.env}
    workdir = st.settings.get("WorkingDir") or "/"
    user = st.settings.get("User") or None
    key = step_key("RUN", st.image.chain_id, argv, env, workdir, user)

    def work(target: Path) -> None:
        cwd = resolve_in_root(target, workdir)
        if not cwd.exists():
            cwd.mkdir(parents=True, mode=0o755)
        status = run_in(target, argv, env=env, cwd=workdir, user=user, hostname="layerstore")
        if status != 0:
            raise BuildError(
                f"line {ins.line}: {ins.text!r} exited with status {status}",
                line=ins.line,
                status=status,
            )

    _layer_step(b, st, key, work)
    _record(b, st, _run_created_by(ins, argv, st.args), empty=False)


def _run_created_by(ins: Instruction, argv: list[str], args: Mapping[str, str]) -> str:
    """buildah's (and docker's) history text of a RUN: ``|N K=V… `` when build args are in
    scope, then the shell command (a JSON form as its array)."""
    shown = " ".join(argv) if ins.json is None else "/bin/sh -c " + json.dumps(list(ins.json))
    if not args:
        return shown
    pairs = " ".join(f"{k}={v}" for k, v in sorted(args.items()))
    return f"|{len(args)} {pairs} {shown}"


def _owner(b: _Build, st: _State, ins: Instruction, root: Path | None) -> Owner:
    mode = ins.flag("chmod")
    chown = ins.flag("chown")
    if mode is not None and not re.fullmatch(r"[0-7]{3,4}", mode):
        raise BuildError(f"line {ins.line}: --chmod={mode}: octal modes only", line=ins.line)
    uid = gid = 0
    if chown:
        spec = expand_word(chown, st.scope, b.escape, ins.line)
        name, _, group = spec.partition(":")
        who = resolve_user(root, f"{name}:{group or name}") if root else None
        if who is None:
            raise BuildError(f"line {ins.line}: --chown needs the image", line=ins.line)
        uid, gid = who.uid, who.gid
    return Owner(uid, gid, int(mode, 8) if mode is not None else None)


def _copy_step(b: _Build, st: _State, ins: Instruction) -> None:
    words = list(ins.json) if ins.json is not None else expand_words(ins.args, st.scope, b.escape)
    if ins.json is not None:
        words = [expand_word(w, st.scope, b.escape, ins.line) for w in words]
    if len(words) < 2:
        raise BuildError(f"line {ins.line}: {ins.keyword} needs a source and a destination")
    *patterns, dest = words
    if ins.keyword == "ADD" and any(re.match(r"^[a-z]+://", p) for p in patterns):
        raise BuildError(f"line {ins.line}: ADD of a URL is not supported", line=ins.line)
    if not dest.startswith("/"):
        workdir = st.settings.get("WorkingDir") or "/"
        dest = workdir.rstrip("/") + "/" + dest + ("/" if dest.endswith("/") else "")
    with ExitStack() as stack:
        context, ignore = b.context, b.ignore
        from_ = ins.flag("from")
        if from_ is not None:
            # --from reads a read-only mount of the stage or image, without .dockerignore.
            _, context = stack.enter_context(
                _mounted(b.store, _from_image(b, from_, ins.line), writable=False)
            )
            ignore = DockerIgnore()
            patterns = [str(resolve_in_root(context, p).relative_to(context)) for p in patterns]
        try:
            srcs = sources(context, patterns, ignore, line=ins.line)
        except FileNotFoundError as e:
            raise BuildError(f"{e}", line=ins.line) from e
        digest = source_digest(srcs, ignore)
        key = step_key(ins.keyword, st.image.chain_id, digest, dest, ins.flags, st.scope)
        kind = "multi" if len(srcs) > 1 else "dir" if srcs[0].path.is_dir() else "file"

        def work(target: Path) -> None:
            owner = _owner(b, st, ins, target)
            extract = _extractor(b) if ins.keyword == "ADD" else None
            copy_into(target, srcs, dest, owner, ignore, extract=extract)

        _layer_step(b, st, key, work)
    _record(b, st, f"{_NOP}{ins.keyword} {kind}:{digest[7:]} in {dest} ", empty=False)


def _extractor(b: _Build) -> Callable[[Path, Path], object]:
    def extract(archive: Path, directory: Path) -> object:
        return b.store.apply(b.store.import_tar(archive), directory)

    return extract


def _from_image(b: _Build, ref: str, line: int) -> Stack:
    for stage in b.stage_list:
        if (stage.name == ref.lower() or str(stage.index) == ref) and stage.index in b.built:
            return b.built[stage.index].image
    return _stored_or_pulled(b, ref, line)


def _healthcheck(ins: Instruction) -> dict[str, Any]:
    words = ins.args.split(None, 1)
    if words[0].upper() == "NONE":
        return {"Test": ["NONE"]}
    if words[0].upper() != "CMD" or len(words) < 2:
        raise BuildError(f"line {ins.line}: HEALTHCHECK needs CMD or NONE", line=ins.line)
    try:
        array = json.loads(words[1]) if words[1].startswith("[") else None
    except ValueError:
        array = None
    check: dict[str, Any] = {"Test": ["CMD", *array] if array else ["CMD-SHELL", words[1]]}
    for name, value in ins.flags:
        if name == "retries":
            check["Retries"] = int(value)
        else:
            key = "".join(p.capitalize() for p in name.split("-"))
            check[key] = _duration(value, ins.line)
    return check


def _config_step(b: _Build, st: _State, ins: Instruction) -> None:
    """An instruction that changes only the config (and adds an empty-layer history entry)."""
    kw, s = ins.keyword, st.settings
    scope = st.scope
    if kw == "ENV":
        st.set_env({k: v or "" for k, v in key_values(ins, scope, b.escape)})
    elif kw == "ARG":
        names = []
        for name, default in key_values(ins, scope, b.escape):
            names.append(name)
            if name in b.build_args:
                st.args[name] = b.build_args[name]
            elif default is not None:
                st.args[name] = default
            elif name in b.global_args:
                st.args[name] = b.global_args[name]
        _record(b, st, f"{_NOP}ARG {' '.join(names)}", empty=True)  # buildah's text
        return
    elif kw == "LABEL":
        s["Labels"] = {**(s.get("Labels") or {}), **dict(key_values(ins, scope, b.escape))}
    elif kw == "WORKDIR":
        path = expand_word(ins.args, scope, b.escape, ins.line)
        s["WorkingDir"] = os.path.normpath(os.path.join(s.get("WorkingDir") or "/", path))
    elif kw == "USER":
        s["User"] = expand_word(ins.args, scope, b.escape, ins.line)
    elif kw in ("CMD", "ENTRYPOINT"):
        value = _command(ins, st.shell) if ins.args else []
        if kw == "ENTRYPOINT":
            s.pop("Cmd", None)  # a new ENTRYPOINT resets the base's CMD (docker's rule)
        s["Cmd" if kw == "CMD" else "Entrypoint"] = value
    elif kw == "EXPOSE":
        ports = s.setdefault("ExposedPorts", {})
        for word in expand_words(ins.args, scope, b.escape, ins.line):
            ports[word if "/" in word else word + "/tcp"] = {}
    elif kw == "VOLUME":
        words = list(ins.json) if ins.json is not None else expand_words(ins.args, scope, b.escape)
        for word in words:
            s.setdefault("Volumes", {})[word] = {}
    elif kw == "SHELL":
        assert ins.json is not None
        st.shell = tuple(ins.json)
    elif kw == "STOPSIGNAL":
        s["StopSignal"] = expand_word(ins.args, scope, b.escape, ins.line)
    elif kw == "HEALTHCHECK":
        s["Healthcheck"] = _healthcheck(ins)
    elif kw == "MAINTAINER":
        st.author = ins.args
    _record(b, st, _NOP + ins.text, empty=True)


def _build_stage(b: _Build, stage: Stage, total: int, counter: list[int]) -> _State:
    counter[0] += 1
    b.say(
        f"STEP {counter[0]}/{total}: FROM {stage.base}"
        + (f" AS {stage.name}" if stage.name else "")
    )
    st = _base(b, stage.base, stage.line)
    for ins in stage.instructions:
        counter[0] += 1
        b.say(f"STEP {counter[0]}/{total}: {ins.text}")
        if ins.keyword == "RUN":
            _run_step(b, st, ins)
        elif ins.keyword in ("COPY", "ADD"):
            _copy_step(b, st, ins)
        else:
            _config_step(b, st, ins)
    return st


def _needed(stage_list: list[Stage], target: int) -> list[int]:
    """The stages ``target`` depends on (through FROM and COPY --from), in order."""
    names = {s.name: s.index for s in stage_list if s.name}
    need: set[int] = set()

    def visit(i: int) -> None:
        if i in need:
            return
        need.add(i)
        stage = stage_list[i]
        refs = [stage.base] + [x.flag("from") or "" for x in stage.instructions]
        for ref in refs:
            j = names.get(ref.lower(), int(ref) if ref.isdigit() else None)
            if j is not None and j < i:
                visit(j)

    visit(target)
    return sorted(need)


def _epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(value) if value.isdigit() else None


def build(
    store: Store,
    context: str | os.PathLike[str],
    dockerfile: str | os.PathLike[str] = "Dockerfile",
    *,
    tag: str | None = None,
    build_args: Mapping[str, str] | None = None,
    target: str | None = None,
    progress: Callable[[str], object] | None = None,
    source_date_epoch: int | None = None,
    pull_options: Mapping[str, Any] | None = None,
) -> Stack:
    """Build the Dockerfile ``dockerfile`` (relative to ``context`` unless absolute) and tag
    the image ``tag`` (default ``build:<12 hex digits of the config>``); return it.

    An image ``FROM`` (or ``COPY --from``) names that the store lacks is pulled from its registry
    with ``Store.pull(ref, **pull_options)`` (e.g. ``{"tls_verify": False}``).
    ``build_args`` set ``ARG`` values; ``target`` names the stage to stop at (default: the
    last); ``progress`` receives one line per step. ``source_date_epoch`` (default
    ``$SOURCE_DATE_EPOCH``) makes the result reproducible. Raises :class:`BuildError` for a
    failing step (with its line and status), :class:`DockerfileError` for a bad Dockerfile.
    """
    ctx = Path(context).resolve()
    path = Path(dockerfile) if Path(dockerfile).is_absolute() else ctx / dockerfile
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise BuildError(f"{path}: no Dockerfile there") from e
    parsed = parse(text)
    head, stage_list = stages(parsed)
    ignore_file = ctx / ".dockerignore"
    ignore = DockerIgnore(ignore_file.read_text() if ignore_file.exists() else "")
    args = dict(build_args or {})
    global_args: dict[str, str] = {}
    for ins in head:
        for name, default in key_values(ins, global_args, parsed.escape):
            value = args.get(name, default)
            if value is not None:
                global_args[name] = value
    b = _Build(
        store,
        ctx,
        ignore,
        parsed.escape,
        args,
        global_args,
        source_date_epoch if source_date_epoch is not None else _epoch(),
        BuildCache(store),
        progress or (lambda _line: None),
        pull_options=dict(pull_options or {}),
        stage_list=stage_list,
    )
    last = stage_list[-1].index
    if target is not None:
        match = [s for s in stage_list if s.name == target.lower()]
        if not match:
            raise BuildError(f"--target {target}: no stage of that name")
        last = match[0].index
    order = _needed(stage_list, last)
    total = sum(1 + len(stage_list[i].instructions) for i in order)
    counter = [0]
    for i in order:
        try:
            b.built[i] = _build_stage(b, stage_list[i], total, counter)
        except (OSError, RunError) as e:
            raise BuildError(f"stage {i}: {e}") from e
    return _finish(b, b.built[last], tag)


def _finish(b: _Build, st: _State, tag: str | None) -> Stack:
    settings = dict(st.settings)
    undated = [{k: v for k, v in h.items() if k != "created"} for h in st.history]
    key = step_key("IMAGE", st.image.chain_id, settings, undated, st.base_history, st.author)
    cached = b.cache.image(key)
    if cached is not None:
        b.say(f"--> using cached image {cached.digest}")
        image = cached
    else:
        created = st.history[-1]["created"] if st.history else b.now()
        image = write_image(
            b.store,
            st.image,
            settings=settings,
            history=st.history,
            base_history=st.base_history,
            base_layers=st.base_layers,
            created=created,
            author=st.author,
            tag=tag or f"build:{key[:12]}",
        )
        assert image.digest is not None
        b.cache.put(key, image.digest)
    if tag:
        b.store.tag(image, tag)
    b.say(f"--> {image.digest}" + (f" {tag}" if tag else ""))
    return image
