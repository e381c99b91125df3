"""YAML text -> plain data, as both config files are read.

Safe YAML with three changes, each for a slip YAML would otherwise let through silently:
duplicate keys in one mapping are errors (YAML keeps the last), dates stay strings, and
numbers remember how they were written (an unquoted IMEI, ``0123`` or ``zone: 010`` is an id,
not octal 83 or 10). A file that is not YAML stops at its first syntax error, with line and
column.
"""

from __future__ import annotations

from typing import Any

import yaml

from exporter.problems import ConfigError


class _Int(int):
    """An int that remembers how it was written (``010`` is an id, not octal 8)."""

    text: str


class _Float(float):
    text: str


class _Loader(yaml.SafeLoader):
    """Safe YAML that rejects duplicate keys, keeps dates as text and numbers' spelling."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Mark] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                mark = first.setdefault((key_node.tag, key_node.value), key_node.start_mark)
                if mark is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key_node.value!r} (first at line {mark.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Int:
    number = _Int(yaml.constructor.SafeConstructor.construct_yaml_int(loader, node))
    number.text = node.value
    return number


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> _Float:
    number = _Float(yaml.constructor.SafeConstructor.construct_yaml_float(loader, node))
    number.text = node.value
    return number


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith(":timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_file(path: str, max_bytes: int) -> bytes:
    """A config file's bytes, at most ``max_bytes`` of them; :class:`ConfigError` naming the
    path when it cannot be read or is larger (a file read whole must be bounded)."""
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: larger than {max_bytes} bytes")
    return data


def load_document(text: str | bytes, source: str) -> Any:
    """YAML text (or bytes) to plain data; raises :class:`ConfigError` naming ``source``."""
    return _load_yaml(_decode(text, source), source)


def _decode(text: str | bytes, source: str) -> str:
    if isinstance(text, bytes):
        if b"\x00" in text:
            raise ConfigError(f"{source}: not a text file (it contains NUL bytes)")
        try:
            return text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{source}: not a UTF-8 text file (invalid byte at offset {exc.start})"
            ) from None
    if "\x00" in text:
        raise ConfigError(f"{source}: not a text file (it contains NUL characters)")
    return text


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_syntax_problem(exc, source)) from None
    except yaml.reader.ReaderError as exc:
        line, column = _line_column(text, exc.position)
        raise ConfigError(
            f"{source}:{line}:{column}: character #x{exc.character:04x} is not allowed in YAML"
        ) from None
    except yaml.YAMLError as exc:  # any other shape of parser error
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None


def _syntax_problem(exc: yaml.MarkedYAMLError, source: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    message = exc.problem or exc.context or "not valid YAML"
    if exc.problem and exc.context:
        at = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        message += f" ({exc.context}{at})"
    return f"{where}: {message}"


def _line_column(text: str, position: int) -> tuple[int, int]:
    line_start = text.rfind("\n", 0, position) + 1
    return text.count("\n", 0, position) + 1, position - line_start + 1
