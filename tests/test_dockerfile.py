"""The Dockerfile parser, word expansion and ``.dockerignore`` (pure: no root, no store).

Expected results follow docker's documentation of the Dockerfile reference (parser directives,
escapes, environment replacement, ``.dockerignore``)."""

from __future__ import annotations

import pytest
from layerstore._dockerfile import (
    DockerfileError,
    DockerIgnore,
    Instruction,
    expand_word,
    expand_words,
    key_values,
    parse,
    stages,
)


def one(text: str) -> Instruction:
    (ins,) = parse("FROM x\n" + text).instructions[1:]
    return ins


def test_keywords_are_case_insensitive_and_kept_upper_case() -> None:
    assert one("run echo hi").keyword == "RUN"


def test_comments_and_blank_lines_are_dropped_and_lines_are_numbered_from_1() -> None:
    d = parse("# a comment\n\nFROM x\n   # indented comment\nRUN a\n")
    assert [(i.line, i.keyword) for i in d.instructions] == [(3, "FROM"), (5, "RUN")]


def test_a_continued_line_joins_and_skips_comment_lines_inside() -> None:
    ins = one("RUN echo a \\\n  # not part of it\n\n  b")
    assert ins.args == "echo a   b"
    assert ins.line == 2


def test_the_escape_directive_changes_the_continuation_character() -> None:
    d = parse("# escape=`\nFROM x\nRUN echo a `\n b\nCOPY c:\\dir d\n")
    assert d.escape == "`"
    assert d.instructions[1].args == "echo a  b"
    assert d.instructions[2].args == "c:\\dir d"


def test_syntax_directive_is_ignored_and_directives_stop_after_the_first_other_line() -> None:
    d = parse("# syntax=docker/dockerfile:1\n# escape=\\\nFROM x\n# escape=`\nRUN a \\\n b\n")
    assert d.escape == "\\"
    assert d.instructions[1].args == "a  b"


def test_a_bad_escape_directive_is_refused() -> None:
    with pytest.raises(DockerfileError, match="escape"):
        parse("# escape=x\nFROM y\n")


def test_json_form_is_recognised_and_a_bad_array_is_shell_form() -> None:
    assert one('CMD ["a", "b c"]').json == ("a", "b c")
    assert one("CMD [not json]").json is None
    assert one('CMD ["a", 1]').json is None
    assert one("ENV A=[1]").json is None  # ENV has no JSON form


def test_flags_are_split_off_and_read_by_name() -> None:
    ins = one("COPY --from=build --chown=1:2 --chmod=600 a b")
    assert ins.flag("from") == "build" and ins.flag("chown") == "1:2"
    assert ins.flag("chmod") == "600" and ins.flag("nope") is None
    assert ins.args == "a b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("RUN --mount=type=cache,target=/x make", "RUN --mount is not supported"),
        ("COPY --link a b", "COPY --link is not supported"),
        ("ADD --checksum=sha256:00 a b", "ADD --checksum is not supported"),
        ("COPY --from a b", "needs a value"),
        ("FROB x", "unknown instruction FROB"),
        ("ONBUILD RUN x", "ONBUILD is not supported"),
        ("SHELL /bin/bash -c", "SHELL needs the JSON form"),
        ("WORKDIR", "WORKDIR needs arguments"),
    ],
)
def test_unsupported_instructions_and_flags_are_errors_naming_their_line(
    text: str, message: str
) -> None:
    with pytest.raises(DockerfileError, match=message) as info:
        parse(f"FROM x\n\n{text}\n")
    assert info.value.line == 3
    assert str(info.value).startswith("Dockerfile line 3: ")


def test_from_platform_is_refused_clearly() -> None:
    with pytest.raises(DockerfileError, match="FROM --platform is not supported"):
        parse("FROM --platform=linux/arm64 x\n")


def test_an_empty_dockerfile_is_an_error() -> None:
    with pytest.raises(DockerfileError, match="no instructions"):
        parse("# only a comment\n")


def test_stages_split_at_from_with_names_and_global_args() -> None:
    head, found = stages(parse("ARG V=1\nFROM a AS Build\nRUN x\nFROM build\nCMD y\n"))
    assert [i.text for i in head] == ["ARG V=1"]
    assert [(s.index, s.base, s.name, len(s.instructions)) for s in found] == [
        (0, "a", "build", 1),
        (1, "build", None, 1),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("RUN x\nFROM a\n", "RUN before the first FROM"),
        ("FROM a AS x\nFROM b AS x\n", "used twice"),
        ("FROM a b\n", "FROM takes an image"),
        ("ARG X\n", "no FROM"),
    ],
)
def test_bad_stage_structure_is_an_error(text: str, message: str) -> None:
    with pytest.raises(DockerfileError, match=message):
        stages(parse(text))


ENV = {"A": "1", "EMPTY": "", "SP": "x y"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("$A ${A} pre${A}post", ["1", "1", "pre1post"]),
        ("${NOPE:-dflt} ${EMPTY:-dflt} ${EMPTY-dflt}", ["dflt", "dflt"]),
        ("${A:+alt} ${NOPE:+alt} ${EMPTY+set}", ["alt", "set"]),
        ("${NOPE:-${A}}", ["1"]),
        ("'$A' \"$A\" \\$A", ["$A", "1", "$A"]),
        ('"a b" c', ["a b", "c"]),
        ("$SP", ["x y"]),  # no word splitting after substitution (docker's rule)
        ("$ $1 a$", ["$", "$1", "a$"]),
        ('"say \\"hi\\""', ['say "hi"']),
    ],
)
def test_variables_are_substituted_as_docker_documents(text: str, words: list[str]) -> None:
    assert expand_words(text, ENV) == words


def test_a_required_variable_that_is_unset_is_an_error() -> None:
    with pytest.raises(DockerfileError, match="NOPE: must be set"):
        expand_word("${NOPE:?must be set}", ENV)
    assert expand_word("${A:?x}", ENV) == "1"


@pytest.mark.parametrize("text", ["${", "${A", "'open", '"open', "${1}"])
def test_malformed_substitutions_and_quotes_are_errors(text: str) -> None:
    with pytest.raises(DockerfileError):
        expand_words(text, ENV)


def test_expand_word_keeps_blanks() -> None:
    assert expand_word("/a b/$A", ENV) == "/a b/1"


def test_env_pairs_see_the_environment_before_the_instruction() -> None:
    ins = one('ENV A=2 B=$A C="two words" D=x\\ y')
    assert key_values(ins, ENV) == [("A", "2"), ("B", "1"), ("C", "two words"), ("D", "x y")]


def test_legacy_env_form_takes_the_rest_of_the_line() -> None:
    assert key_values(one("ENV NAME some value $A"), ENV) == [("NAME", "some value 1")]


def test_arg_without_default_and_label_pairs() -> None:
    assert key_values(one("ARG X Y=2"), ENV) == [("X", None), ("Y", "2")]
    assert key_values(one('LABEL "a.b"=c d="e f"'), ENV) == [("a.b", "c"), ("d", "e f")]
    with pytest.raises(DockerfileError, match="expected key=value"):
        key_values(one("LABEL lonely"), ENV)


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        ("*.md", "README.md", True),
        ("*.md", "docs/README.md", False),  # * does not cross /
        ("**/*.md", "docs/deep/README.md", True),
        ("**/*.md", "README.md", True),
        ("build", "build/out/x", True),  # a directory excludes its contents
        ("build", "builder", False),
        ("*.md\n!KEEP.md", "KEEP.md", False),
        ("*.md\n!KEEP.md\n*", "KEEP.md", True),  # the last match decides
        ("# comment\n\n  tmp  ", "tmp", True),
        ("/abs/./x/../y", "abs/y", True),
        ("a?c", "abc", True),
        ("[a-c]x", "bx", True),
        ("[^a-c]x", "bx", False),
        ("docs/**", "docs/a/b", True),
    ],
)
def test_dockerignore_patterns(patterns: str, path: str, excluded: bool) -> None:
    assert DockerIgnore(patterns).excluded(path) is excluded


def test_dockerignore_filter_keeps_the_rest() -> None:
    assert DockerIgnore("*.tmp").filter(["a.tmp", "b", "c/d.tmp"]) == ["b", "c/d.tmp"]
