"""Dockerfiles as docker documents them: :func:`parse`, word expansion, ``.dockerignore``.

Pure functions, no I/O but what their arguments give them. :func:`parse` turns the text into
:class:`Instruction`\\s (parser directives, comments, line continuations with the ``escape``
character, JSON or shell form, flags); :func:`stages` groups them by ``FROM``. The values an
instruction uses depend on the ``ARG`` and ``ENV`` in force when it runs, so expansion is a
separate step (:func:`expand_words`, :func:`expand_word`, :func:`key_values`) that the builder
calls with its environment: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:+alt}``, ``${VAR+alt}``, ``${VAR:?message}``; single quotes keep text literal, double
quotes keep spaces, and the escape character escapes. Unknown instructions, flags this builder
does not honour (``RUN --mount``, ``COPY --link``…), ``FROM --platform`` and ``ONBUILD`` are
errors naming their line, never ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from layerstore._errors import LayerstoreError

__all__ = [
    "DockerIgnore",
    "Dockerfile",
    "DockerfileError",
    "Instruction",
    "Stage",
    "expand_word",
    "expand_words",
    "key_values",
    "parse",
    "stages",
]

#: Flags each instruction accepts (anything else is refused, naming the line).
FLAGS: dict[str, frozenset[str]] = {
    "FROM": frozenset(),
    "RUN": frozenset(),
    "COPY": frozenset({"from", "chown", "chmod"}),
    "ADD": frozenset({"chown", "chmod"}),
    "ENV": frozenset(),
    "ARG": frozenset(),
    "WORKDIR": frozenset(),
    "USER": frozenset(),
    "LABEL": frozenset(),
    "CMD": frozenset(),
    "ENTRYPOINT": frozenset(),
    "EXPOSE": frozenset(),
    "VOLUME": frozenset(),
    "SHELL": frozenset(),
    "STOPSIGNAL": frozenset(),
    "HEALTHCHECK": frozenset({"interval", "timeout", "start-period", "start-interval", "retries"}),
    "MAINTAINER": frozenset(),
}
#: Instructions whose arguments may be a JSON array.
JSON_FORMS = frozenset({"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME"})
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_FLAG = re.compile(r"^--([a-z][a-z-]*)(?:=(.*))?$")


class DockerfileError(LayerstoreError, ValueError):
    """A Dockerfile that cannot be built: bad syntax, an unknown or unsupported instruction or
    flag. ``line`` is the 1-based line of the instruction (0 when it concerns the whole file)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(f"Dockerfile line {line}: {message}" if line else message)
        self.line = line


@dataclass(frozen=True)
class Instruction:
    """One instruction: its keyword (upper case), flags, arguments as written and, for the JSON
    form, the parsed array. ``line`` is where it starts; ``text`` is the whole instruction as
    one line (continuations joined), used in history entries."""

    line: int
    keyword: str
    flags: tuple[tuple[str, str], ...]
    args: str
    json: tuple[str, ...] | None
    text: str

    def flag(self, name: str) -> str | None:
        """The value of ``--name`` (the last one given), or None."""
        values = [v for k, v in self.flags if k == name]
        return values[-1] if values else None


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile: its instructions and the escape character in force."""

    instructions: tuple[Instruction, ...]
    escape: str = "\\"


@dataclass
class Stage:
    """A build stage: ``FROM base [AS name]`` and the instructions after it."""

    index: int
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


def _logical_lines(text: str, escape: str, start: int) -> Iterable[tuple[int, str]]:
    """Join continued lines; drop comment lines and blank lines (also inside continuations)."""
    lines = text.splitlines()
    i = start
    while i < len(lines):
        first = i
        parts: list[str] = []
        while i < len(lines):
            raw = lines[i]
            i += 1
            stripped = raw.strip()
            if stripped.startswith("#") or not stripped:
                if not parts:
                    first = i
                continue
            body = raw.rstrip()
            if body.endswith(escape):
                parts.append(body[:-1])
                continue
            parts.append(raw)
            break
        joined = "".join(parts).strip()
        if joined:
            yield first + 1, joined


def _directives(lines: list[str]) -> tuple[dict[str, str], int]:
    found: dict[str, str] = {}
    for i, line in enumerate(lines):
        m = _DIRECTIVE.match(line.strip())
        if not m or m.group(1).lower() in found:
            return found, i
        found[m.group(1).lower()] = m.group(2)
    return found, len(lines)


def _split_flags(keyword: str, rest: str, line: int) -> tuple[tuple[tuple[str, str], ...], str]:
    flags: list[tuple[str, str]] = []
    while rest.startswith("--"):
        word, _, tail = rest.partition(" ")
        m = _FLAG.match(word)
        if not m:
            raise DockerfileError(f"{keyword}: malformed flag {word!r}", line)
        name = m.group(1)
        if keyword == "FROM" and name == "platform":
            raise DockerfileError("FROM --platform is not supported (this machine's only)", line)
        if name not in FLAGS[keyword]:
            raise DockerfileError(f"{keyword} --{name} is not supported", line)
        if m.group(2) is None:
            raise DockerfileError(f"{keyword} --{name} needs a value (--{name}=...)", line)
        flags.append((name, m.group(2)))
        rest = tail.lstrip()
    return tuple(flags), rest


def _json_array(args: str) -> tuple[str, ...] | None:
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def parse(text: str) -> Dockerfile:
    """Parse a Dockerfile's text. Raises :class:`DockerfileError` naming the bad line."""
    lines = text.splitlines()
    directives, start = _directives(lines)
    escape = directives.get("escape", "\\")
    if escape not in ("\\", "`"):
        raise DockerfileError(f"escape directive must be \\ or `, not {escape!r}", 1)
    result = []
    for number, logical in _logical_lines(text, escape, start):
        keyword, _, rest = logical.partition(" ")
        if "\t" in keyword:
            keyword, _, more = keyword.partition("\t")
            rest = more + " " + rest
        upper = keyword.upper()
        if upper == "ONBUILD":
            raise DockerfileError("ONBUILD is not supported", number)
        if upper not in FLAGS:
            raise DockerfileError(f"unknown instruction {keyword}", number)
        flags, args = _split_flags(upper, rest.strip(), number)
        array = _json_array(args) if upper in JSON_FORMS else None
        if upper == "SHELL" and array is None:
            raise DockerfileError('SHELL needs the JSON form: SHELL ["executable", "arg"]', number)
        if not args and upper not in ("RUN", "CMD", "ENTRYPOINT"):
            raise DockerfileError(f"{upper} needs arguments", number)
        result.append(Instruction(number, upper, flags, args, array, f"{upper} {rest.strip()}"))
    if not result:
        raise DockerfileError("the Dockerfile has no instructions")
    return Dockerfile(tuple(result), escape)


def stages(dockerfile: Dockerfile) -> tuple[list[Instruction], list[Stage]]:
    """The ``ARG``\\s before the first ``FROM`` (usable in ``FROM`` lines), and the stages."""
    head: list[Instruction] = []
    found: list[Stage] = []
    for ins in dockerfile.instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            if len(words) == 3 and words[1].lower() == "as":
                name: str | None = words[2].lower()
            elif len(words) == 1:
                name = None
            else:
                raise DockerfileError("FROM takes an image and optionally AS name", ins.line)
            if name and any(s.name == name for s in found):
                raise DockerfileError(f"stage name {name!r} used twice", ins.line)
            found.append(Stage(len(found), words[0], name, ins.line))
        elif not found:
            if ins.keyword != "ARG":
                raise DockerfileError(f"{ins.keyword} before the first FROM", ins.line)
            head.append(ins)
        else:
            found[-1].instructions.append(ins)
    if not found:
        raise DockerfileError("no FROM instruction")
    return head, found


# --- word expansion (docker's shell-like lexer) ---------------------------------------------


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str, line: int) -> None:
        self.text = text
        self.env = env
        self.escape = escape
        self.line = line
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        ch = self.peek()
        self.pos += 1
        return ch

    def words(self, split: bool) -> list[str]:
        """Words at unquoted blanks (when ``split``); an unquoted word that expands to nothing
        is no word, as in a shell."""
        words: list[str] = []
        current: list[str] = []
        quoted = False
        while self.pos < len(self.text):
            ch = self.peek()
            if split and ch in " \t\n":
                self.pos += 1
                if "".join(current) or quoted:
                    words.append("".join(current))
                current, quoted = [], False
                continue
            self.pos += 1
            if ch == "'":
                end = self.text.find("'", self.pos)
                if end < 0:
                    raise DockerfileError("unterminated single quote", self.line)
                current.append(self.text[self.pos : end])
                self.pos, quoted = end + 1, True
            elif ch == '"':
                current.append(self.double_quoted())
                quoted = True
            elif ch == self.escape:
                current.append(self.take())
                quoted = True
            elif ch == "$":
                current.append(self.variable())
            else:
                current.append(ch)
        if "".join(current) or quoted or not split:
            words.append("".join(current))
        return words

    def double_quoted(self) -> str:
        out: list[str] = []
        while True:
            ch = self.take()
            if ch == "":
                raise DockerfileError("unterminated double quote", self.line)
            if ch == '"':
                return "".join(out)
            if ch == self.escape and self.peek() in ('"', "$", self.escape):
                out.append(self.take())
            elif ch == "$":
                out.append(self.variable())
            else:
                out.append(ch)

    def variable(self) -> str:
        if self.peek() != "{":
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", self.text[self.pos :])
            if not m:
                return "$"
            self.pos += m.end()
            return self.env.get(m.group(0), "")
        self.pos += 1
        m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", self.text[self.pos :])
        if not m:
            raise DockerfileError("bad substitution: ${ needs a variable name", self.line)
        name = m.group(0)
        self.pos += m.end()
        if self.peek() == "}":
            self.pos += 1
            return self.env.get(name, "")
        colon = self.peek() == ":"
        if colon:
            self.pos += 1
        op = self.take()
        if op not in "-+?" or not op:
            raise DockerfileError(f"unsupported substitution in ${{{name}...}}", self.line)
        word = self.nested_word()
        value = self.env.get(name)
        unset = value is None or (colon and value == "")
        if op == "-":
            return word if unset else str(value)
        if op == "+":
            return "" if unset else word
        if unset:
            raise DockerfileError(f"{name}: {word or 'is not set'}", self.line)
        return str(value)

    def nested_word(self) -> str:
        out: list[str] = []
        while True:
            ch = self.take()
            if ch == "":
                raise DockerfileError("missing } in substitution", self.line)
            if ch == "}":
                return "".join(out)
            if ch == self.escape:
                out.append(self.take())
            elif ch == "$":
                out.append(self.variable())
            elif ch in "'\"":
                end = self.text.find(ch, self.pos)
                if end < 0:
                    raise DockerfileError("unterminated quote", self.line)
                inner = self.text[self.pos : end]
                self.pos = end + 1
                out.append(inner if ch == "'" else expand_word(inner, self.env, self.escape))
            else:
                out.append(ch)


def expand_words(text: str, env: Mapping[str, str], escape: str = "\\", line: int = 0) -> list[str]:
    """Split ``text`` into words at unquoted blanks, substituting variables and removing quotes
    (what docker does to ``COPY``, ``EXPOSE``, ``VOLUME``… arguments)."""
    return _Lexer(text, env, escape, line).words(split=True)


def expand_word(text: str, env: Mapping[str, str], escape: str = "\\", line: int = 0) -> str:
    """``text`` as one word, variables substituted and quotes removed (``WORKDIR``, ``USER``)."""
    return "".join(_Lexer(text, env, escape, line).words(split=False))


def _raw_words(text: str, escape: str) -> list[str]:
    """Split at unquoted blanks, keeping quotes and escapes for the expansion of each word."""
    words: list[str] = []
    current: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == escape and i + 1 < len(text) and quote != "'":
            current.append(text[i : i + 2])
            i += 2
            continue
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in " \t":
            if current:
                words.append("".join(current))
                current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    if current:
        words.append("".join(current))
    return words


def key_values(
    ins: Instruction, env: Mapping[str, str], escape: str = "\\"
) -> list[tuple[str, str | None]]:
    """The ``key=value`` pairs of an ``ENV``, ``LABEL`` or ``ARG`` (``ARG name`` gives
    ``(name, None)``; the legacy ``ENV key value`` one pair). Values see ``env`` as it was
    before the instruction, as docker's do."""
    words = _raw_words(ins.args, escape)
    if ins.keyword == "ENV" and words and "=" not in words[0]:
        key, _, rest = ins.args.partition(" ")
        if not rest.strip():
            raise DockerfileError("ENV needs a value", ins.line)
        return [(key, expand_word(rest.strip(), env, escape, ins.line))]
    pairs: list[tuple[str, str | None]] = []
    for word in words:
        key, eq, value = word.partition("=")
        key = expand_word(key, env, escape, ins.line)
        if not key:
            raise DockerfileError(f"{ins.keyword}: empty name in {word!r}", ins.line)
        if not eq:
            if ins.keyword != "ARG":
                raise DockerfileError(f"{ins.keyword} {word!r}: expected key=value", ins.line)
            pairs.append((key, None))
        else:
            pairs.append((key, expand_word(value, env, escape, ins.line)))
    return pairs


# --- .dockerignore ---------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise DockerfileError(f".dockerignore: bad pattern {pattern!r}")
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
            i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _clean(path: str) -> str:
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


class DockerIgnore:
    """``.dockerignore`` patterns: ``*``, ``?``, ``[…]``, ``**`` and ``!`` exceptions, the last
    matching pattern deciding; a pattern that matches a directory excludes what it holds."""

    def __init__(self, text: str = "") -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            pattern = _clean(line[1:].strip() if exception else line)
            if not pattern:
                continue
            self.rules.append((exception, re.compile(_pattern_regex(pattern) + r"(?:/.*)?\Z")))

    def excluded(self, path: str) -> bool:
        """Whether ``path`` (relative to the context, ``/``-separated) is left out."""
        path = _clean(path)
        result = False
        for exception, regex in self.rules:
            if regex.match(path):
                result = not exception
        return result

    def filter(self, paths: Sequence[str]) -> list[str]:
        """The paths that are not excluded."""
        return [p for p in paths if not self.excluded(p)]
