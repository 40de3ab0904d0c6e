"""Config as data: frozen dataclasses built from plain dicts (YAML) with strict key and type checks.

``from_dict(cls, data)`` builds a (possibly nested) dataclass, raising ``ConfigError`` that names
the full dotted key for an unknown key, a missing required key or a value of the wrong type.
``override(config, ["a.b=3", ...])`` applies ``key=value`` strings (values parsed as YAML).
"""

import copy
import dataclasses
import types
import typing

import yaml


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type, or its value is out of range."""


# The one set of value checks that every config dataclass's ``__post_init__`` uses.
def require(condition, key, message):
    """Raises ``ConfigError("<key> <message>")`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key} {message}")


def require_positive_int(value, key):
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key,
            f"must be a positive integer, got {value!r}")


def require_positive(value, key):
    """A positive real number (an int or a float, not a bool)."""
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, key,
            f"must be > 0, got {value!r}")


def from_dict(cls, data, path=""):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {path}" if path else ""
        raise ConfigError(f"unknown config key{where}: {_join(path, unknown[0])} "
                          f"(known keys: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        key = _join(path, name)
        if name in data:
            values[name] = _coerce(hints[name], data[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key: {key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError) and (not path or str(err).startswith(path)):
            raise
        # A check that names its field relative to this dataclass gets the dotted path in front.
        raise ConfigError(f"{path or cls.__name__}: {err}") from err


def to_dict(config):
    return dataclasses.asdict(config)


def load_yaml(cls, path):
    """``cls`` built from a YAML file (``read_yaml``'s errors for a file that does not read)."""
    return from_dict(cls, read_yaml(path))


def read_yaml(path) -> dict:
    """The mapping a YAML config file holds (``{}`` for an empty file); ``ConfigError`` when
    the file is missing, unreadable, not YAML or not a mapping."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except IsADirectoryError as err:
        raise ConfigError(f"config file {path} is a folder, not a YAML file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from err
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{at}: {problem}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got "
                          f"{type(data).__name__}")
    return data


def override(config, assignments):
    """Returns ``config`` with ``["model.d_model=256", ...]`` applied (values parsed as YAML)."""
    data = to_dict(config)
    for assignment in assignments:
        assign(data, assignment)
    return from_dict(type(config), data)


def assign(data, assignment, open_depth=None):
    """Applies one ``"a.b.c=value"`` (value parsed as YAML) to the nested dict ``data``.

    Every key must exist, except below the first ``open_depth`` levels (when given), where
    missing levels are created: a mapping of free-form entries, checked later by ``from_dict``.
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts):
        is_open = open_depth is not None and i >= open_depth
        if part not in node and not is_open:
            raise ConfigError(f"unknown config key: {'.'.join(parts[:i + 1])} (in override "
                              f"{assignment!r})")
        if i == len(parts) - 1:
            node[part] = yaml.safe_load(raw)
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {'.'.join(parts[:i + 1])} is not a mapping (in "
                                  f"override {assignment!r})")


def _join(path, name):
    return f"{path}.{name}" if path else name


def _coerce(hint, value, key):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key {key}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key {key} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} must be a list, got {value!r}")
        item = args[0] if args else typing.Any
        return origin(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML reads 3e-4 as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"config key {key} must be {hint.__name__}, got "
                              f"{type(value).__name__} {value!r}")
        return value
    return value


def merge_dicts(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied key by key (nested mappings merge recursively); neither
    argument is modified."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
