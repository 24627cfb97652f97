"""Typed configs: frozen dataclasses with a docstring under each field become CLI options and config files.

A config is a frozen dataclass whose fields are `int`, `float`, `str`, `bool`, `Literal[...]`, `tuple[T, ...]` or
`tuple[T, T]` (T one of the scalars), `X | None`, or another such dataclass (nested, e.g. `maml: MamlConfig`).
Values are resolved in order: the dataclass defaults, then a JSON or TOML file (nested tables for nested
dataclasses), then CLI overrides (flat dotted keys such as `maml.inner_lr`). Every value is checked against its
declared type; files are parsed as data, never executed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from metarl.checkpoint import atomic_write_bytes

C = TypeVar("C")
_SCALARS: tuple[type, ...] = (bool, int, float, str)


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass."""


def field_docs(cls: type) -> dict[str, str]:
    """`{field name: docstring}` read from the string literal under each field in the source of `cls` and its bases.

    Classes whose source is unavailable (e.g. defined in an interactive session) contribute no docs.
    """
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    docs = {}
    for stmt, nxt in zip(node.body, node.body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and _is_str_expr(nxt):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)  # type: ignore[attr-defined]
    return docs


def _is_str_expr(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of dataclass `cls` (works with `from __future__ import annotations`)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _optional_inner(tp: Any) -> Any | None:
    """`X` for `X | None` / `Optional[X]`, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _tuple_spec(tp: Any) -> tuple[type, int | None] | None:
    """`(element type, length or None for any length)` for `tuple[T, ...]` / `tuple[T, T]`, else None."""
    if typing.get_origin(tp) is not tuple:
        return None
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return args[0], None
    if args and all(a is args[0] for a in args):
        return args[0], len(args)
    return None


def _type_name(tp: Any) -> str:
    if (inner := _optional_inner(tp)) is not None:
        return f"{_type_name(inner)} | None"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if (spec := _tuple_spec(tp)) is not None:
        elem, n = spec
        return f"list of {'any number of' if n is None else n} {_type_name(elem)} values"
    return getattr(tp, "__name__", repr(tp))


def _is_nested(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default(f: dataclasses.Field) -> Any:
    """The field's default value, or `dataclasses.MISSING`."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# ----------------------------------------------------------------------------------------------------- CLI


def add_dataclass_arguments(parser: argparse._ActionsContainer, cls: type, prefix: str = "") -> None:
    """Add one `--{prefix}{field-name}` option per field of `cls` to `parser` (a parser or an argument group).

    Nested dataclass fields recurse with prefix `{prefix}{name}.`. Each option's dest is the dotted field path
    (e.g. `maml.inner_lr`) and its default is `argparse.SUPPRESS`, so the parsed namespace holds only what the
    user typed; collect it with `overrides_from_namespace`.
    """
    _add_arguments(parser, cls, prefix, None)


def _add_arguments(parser: argparse._ActionsContainer, cls: type, prefix: str, defaults: Any) -> None:
    """`add_dataclass_arguments`, showing the field values of `defaults` (an instance of `cls`) when given."""
    docs = field_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, key = hints[f.name], prefix + f.name
        default = _default(f) if defaults is None else getattr(defaults, f.name)
        if _is_nested(tp):
            _add_arguments(parser, tp, key + ".", default if isinstance(default, tp) else None)
            continue
        shown = "required" if default is dataclasses.MISSING else f"default: {_cli_text(default)}"
        help_text = f"{docs.get(f.name, '')} ({shown})".strip().replace("%", "%%")
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=help_text, **_argparse_kwargs(tp, key))


def _cli_text(value: Any) -> str:
    """How `value` is typed on the command line."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _argparse_kwargs(tp: Any, key: str) -> dict[str, Any]:
    """`add_argument` keyword arguments for a field of type `tp`."""
    inner = _optional_inner(tp)
    base = tp if inner is None else inner
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        return {"type": _optional(_literal_parser(choices), inner is not None), "choices": choices + ((None,) if inner else ()),
                "metavar": "{" + ",".join(map(str, choices)) + "}"}
    if (spec := _tuple_spec(base)) is not None and spec[0] in _SCALARS:
        elem, n = spec
        metavar = ",".join([elem.__name__.upper()] * (n or 1)) + ("" if n else ",...")
        return {"type": _optional(_tuple_parser(elem, n), inner is not None), "metavar": metavar + ("|none" if inner else "")}
    if base in (int, float, str):
        return {"type": _optional(base, inner is not None), "metavar": base.__name__.upper() + ("|none" if inner else "")}
    raise TypeError(f"config field {key!r}: unsupported type {_type_name(tp)}")


def _optional(parse: Callable[[str], Any], optional: bool) -> Callable[[str], Any]:
    """`parse`, also mapping `none` to None when the field is optional."""
    if not optional:
        return parse

    def parse_optional(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parse_optional.__name__ = getattr(parse, "__name__", "value")
    return parse_optional


def _literal_parser(choices: tuple[Any, ...]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return next((c for c in choices if str(c) == text), text)

    return parse


def _tuple_parser(elem: type, n: int | None) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        if n is not None and len(parts) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated {elem.__name__} values, got {text!r}")
        try:
            return tuple(_parse_scalar(elem, p) for p in parts)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {elem.__name__} values, got {text!r}") from err

    parse.__name__ = f"{elem.__name__} list"
    return parse


def _parse_scalar(elem: type, text: str) -> Any:
    if elem is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    return elem(text)


def overrides_from_namespace(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The options of `cls` (added with `add_dataclass_arguments(..., prefix)`) that the user typed, as dotted keys."""
    values = vars(args)
    return {key: values[prefix + key] for key in _dotted_keys(cls) if prefix + key in values}


def _dotted_keys(cls: type) -> list[str]:
    """Every leaf field of `cls` as a dotted path, e.g. `["seed", "maml.inner_lr"]`."""
    keys = []
    for name, tp in _hints(cls).items():
        keys += [f"{name}.{k}" for k in _dotted_keys(tp)] if _is_nested(tp) else [name]
    return keys


# ----------------------------------------------------------------------------------------------------- build


def build_config(cls: type[C], file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> C:
    """`cls` from its defaults, then the JSON/TOML `file` (if any), then flat dotted `overrides` (which win)."""
    data = _read_file(Path(file)) if file is not None else {}
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return _from_dict(cls, data, "")


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """`cls` from a nested dict such as `config_to_dict` returns; missing keys take their defaults."""
    return _from_dict(cls, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested JSON-serialisable dict of a config (tuples become lists)."""
    return {f.name: _to_plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def save_config(cfg: Any, path: str | Path) -> None:
    """Write `cfg` to `path` as indented JSON, atomically."""
    atomic_write_bytes(Path(path), (json.dumps(config_to_dict(cfg), indent=2) + "\n").encode())


def _read_file(path: Path) -> dict[str, Any]:
    """The nested dict in a `.json` or `.toml` config file."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise ConfigError(f"config file {path}: expected a .json or .toml file")
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it ({err.strerror or err})") from err
    except ValueError as err:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        raise ConfigError(f"config file {path}: not valid {suffix[1:].upper()}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of keys at the top level, got {type(data).__name__}")
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """`data[a][b] = value` for `key == "a.b"`, creating (or copying) the inner tables."""
    head, _, rest = key.partition(".")
    if not rest:
        data[head] = value
        return
    inner = data.get(head)
    data[head] = dict(inner) if isinstance(inner, Mapping) else {}
    _set_dotted(data[head], rest, value)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`base` updated with `top`, merging inner tables key by key."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _from_dict(cls: type[C], data: Mapping[str, Any], path: str) -> C:
    """Build dataclass `cls` from `data`, checking keys and types; `path` is the dotted prefix used in errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {path.rstrip('.')!r}: expected a table, got {data!r}")
    hints = _hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        valid = ", ".join(path + k for k in _dotted_keys(cls))
        raise ConfigError(f"unknown config key(s) {', '.join(path + k for k in unknown)}; valid keys: {valid}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {name: _convert(hints[name], value, f"{path}{name}", fields[name]) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        where = f"config key {path.rstrip('.')!r}" if path else f"config {cls.__name__}"
        raise ConfigError(f"{where}: {err}") from err


def _convert(tp: Any, value: Any, key: str, f: dataclasses.Field | None = None) -> Any:
    """`value` checked against (and converted to) type `tp`; `key` names it in errors."""
    if _is_nested(tp):
        if isinstance(value, tp):
            return value
        base = _default(f) if f is not None else dataclasses.MISSING
        merged = _merge(config_to_dict(base), value) if isinstance(value, Mapping) and isinstance(base, tp) else value
        return _from_dict(tp, merged, key + ".")
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _convert(inner, value, key)
    if typing.get_origin(tp) is Literal:
        for choice in typing.get_args(tp):
            if value == choice and type(value) is type(choice):
                return choice
    elif (spec := _tuple_spec(tp)) is not None:
        if isinstance(value, list | tuple) and (spec[1] is None or len(value) == spec[1]):
            return tuple(_convert(spec[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp in _SCALARS:
        if type(value) is tp:
            return value
    else:
        raise ConfigError(f"config key {key!r}: unsupported field type {_type_name(tp)}")
    raise ConfigError(f"config key {key!r}: got {value!r}, expected {_type_name(tp)}")
