"""The command line and YAML files of a run: argv and files -> a checked, finalized `TrainConfig`.

    python -m cepo.train [--config FILE ...] [--preset paper|reference] [--KEY VALUE ...]

Layers, later ones winning: the preset, then the YAML files (none given: the built-in offline run,
`cepo.config.presets.offline`), then the flags. A flag is ``--section.key value``,
``--section.key=value``, or ``--key`` alone when that last part names one option only (``--lr``,
``--group_size``); a bare boolean flag (``--resume``) means true; tuples take comma-separated text
(``--optim.betas 0.9,0.99``) and ``none`` clears an optional value.

Typing the values and building the nested dataclasses is jsonargparse's (`_parser`); this module
adds what the CLI promised before it: short keys, the renamed keys' old names, and one-line errors
that name the key, the value and what is allowed ("unknown option 'lamda0'; did you mean
cepo.lambda_init?"), and YAML errors that name the file and line.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import types
import typing
import warnings
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from cepo.config.presets import PRESETS, finalize, offline
from cepo.config.schema import RENAMED, TrainConfig, flatten, to_dict, unflatten
from cepo.errors import ConfigError

# --------------------------------------------------------------------------- keys


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def option_types(cls=TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every leaf option as ``{"section.key": type}``, in declaration order."""
    out = {}
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        if is_dataclass(tp):
            out.update(option_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


_warned: set[str] = set()


def _renamed(key: str) -> str | None:
    """The new name of an old (renamed) key, full or its last part; warns once per old name."""
    for old, new in RENAMED.items():
        if key in (old, old.rpartition(".")[2]):
            if old not in _warned:
                _warned.add(old)
                warnings.warn(f"option {key!r} was renamed to {new!r}; the old name will be "
                              "removed in a later release", FutureWarning, stacklevel=3)
            return new
    return None


def resolve_key(key: str, types_: dict[str, Any] | None = None) -> str:
    """The full dotted name of `key`: itself, the one option whose last part(s) it is, or the new
    name of a renamed option."""
    types_ = types_ or option_types()
    key = key.replace("-", "_")
    if key in types_:
        return key
    matches = [k for k in types_ if k.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"{key!r} is ambiguous: say which of {', '.join(matches)}")
    new = _renamed(key)
    if new is not None:
        return new
    names = {k: k for k in types_} | {k.rpartition(".")[2]: k for k in types_}
    names |= {k: v for old, v in RENAMED.items() for k in (old, old.rpartition(".")[2])}
    close = sorted({names[m] for m in difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)})
    hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for every option"
    raise ConfigError(f"unknown option {key!r}{hint}")


# --------------------------------------------------------------------------- values


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or none"
    if origin is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp))


def _allowed(tp: Any) -> str:
    """What a value of type `tp` may be, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_allowed(a) for a in args if a is not type(None)) + " or none"
    if origin is Literal:
        return f"one of {', '.join(map(str, args))}"
    if origin is tuple:
        count = "a list" if args[-1] is Ellipsis else f"{len(args)} values"
        return f"{count} (comma-separated text) of {_allowed(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a finite number",
            str: "text"}.get(tp, _type_name(tp))


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NONE = ("none", "null", "~")


def _prepare(value: Any, tp: Any) -> Any:
    """A CLI string or YAML value in the form the parser takes for type `tp`: comma-separated text
    for tuples, "none" for None, yes/no/1/0 for booleans, numbers as text for str options, and
    YAML booleans as "true"/"false" for a choice that has those words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, str) and value.strip().lower() in _NONE and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _prepare(value, inner[0]) if len(inner) == 1 and value is not None else value
    if origin is tuple and isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    if origin is Literal and isinstance(value, bool) and {"true", "false"} <= set(args):
        return "true" if value else "false"  # YAML's unquoted true/false for a "true" choice
    if tp is bool and isinstance(value, str):
        text = value.strip().lower()
        return True if text in _TRUE else False if text in _FALSE else value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is int and not isinstance(value, bool):  # 1e6, 2.0: whole numbers written as floats
        number = value
        if isinstance(value, str) and not value.strip().lstrip("+-").isdigit():
            try:
                number = float(value)
            except ValueError:
                return value
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
    return value


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, float)]
    return []


@functools.cache
def _parser():
    """jsonargparse's parser of `TrainConfig`: types the values and nests the sections (built
    once, on first use; --help never needs it)."""
    import jsonargparse

    parser = jsonargparse.ArgumentParser(exit_on_error=False, default_env=False)
    parser.add_class_arguments(TrainConfig, as_group=True)
    return parser


def _decode(flat: dict[str, Any], raw: dict[str, Any]) -> TrainConfig:
    """`TrainConfig` from a complete flat mapping; `raw` holds the values as the user gave them."""
    import jsonargparse

    types_ = option_types()
    try:
        typed = flatten(_parser().parse_object(unflatten(flat), defaults=False).as_dict())
    except jsonargparse.ArgumentError as err:
        match = re.search(r'Parser key "([\w.]+)"', str(err))
        key = match.group(1) if match else None
        if key not in types_:
            raise ConfigError(str(err).splitlines()[0]) from None
        raise ConfigError(f"{key}={raw.get(key, flat[key])!r} is not allowed: "
                          f"{_allowed(types_[key])}") from None
    for key, value in typed.items():
        if any(not math.isfinite(v) for v in _floats(value)):  # YAML .inf/.nan, CLI inf/nan
            raise ConfigError(f"{key}={raw.get(key, value)!r} is not allowed: a finite number")
    sections = {}
    for f in fields(TrainConfig):
        tp = _hints(TrainConfig)[f.name]
        if is_dataclass(tp):
            values = {k.partition(".")[2]: v for k, v in typed.items()
                      if k.startswith(f.name + ".")}
            try:
                sections[f.name] = tp(**values)
            except ConfigError:
                raise
            except (ValueError, TypeError) as err:  # sections that raise plain ValueError
                raise ConfigError(f"{f.name}: {err}") from None
    top = {k: v for k, v in typed.items() if "." not in k}
    return TrainConfig(**top, **sections)


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A new config with (dotted, short or old-name) key overrides applied and checked."""
    types_ = option_types()
    flat, raw = flatten(to_dict(cfg)), {}
    for key, value in overrides.items():
        full = resolve_key(key, types_)
        flat[full] = _prepare(value, types_[full])
        raw[full] = value
    return _decode(flat, raw)


# --------------------------------------------------------------------------- YAML files


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a flat ``{"section.key": value}`` dict."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:  # syntax errors, and tags (!!python/...): never constructed
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        why = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {why}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return flatten(data)


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_yaml(path: str | Path) -> TrainConfig:
    """A saved (complete) config, e.g. a checkpoint's config.yaml (old option names included)."""
    flat = load_yaml(path)
    base = PRESETS[flat.get("preset", "paper")]()
    return apply_overrides(base, flat)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> tuple[list[str], str | None, dict[str, Any], bool]:
    """Split argv into (config files, preset, overrides, wants help)."""
    files, preset, overrides, wants_help = [], None, {}, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            wants_help = True
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and not _is_number(nxt)):
                if key in ("config", "preset") or option_types()[resolve_key(key)] is not bool:
                    raise ConfigError(f"--{key} needs a value (--{key} VALUE or --{key}=VALUE)")
                value = "true"  # a bare flag: --resume
            else:
                value, i = nxt, i + 1
        i += 1
        if key == "config":
            files.append(value)
        elif key == "preset":
            preset = value
        else:
            overrides[key] = value
    return files, preset, overrides, wants_help


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def build_config(argv: list[str]) -> TrainConfig:
    """The finalized config of a command line (see the module docstring for the layers), checked
    against this machine (`check_machine`) so a run fails before any set-up."""
    files, preset, overrides, _ = parse_args(argv)
    layers = [load_yaml(f) for f in files]
    if preset is None:
        presets = [layer["preset"] for layer in layers if "preset" in layer]
        preset = presets[-1] if presets else "paper"
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is not allowed: one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]() if files else offline(PRESETS[preset]())
    for layer in layers:
        cfg = apply_overrides(cfg, {k: v for k, v in layer.items() if k != "preset"})
    cfg = finalize(apply_overrides(cfg, overrides))
    check_machine(cfg)
    return cfg


def check_machine(cfg: TrainConfig) -> None:
    """Refuse settings this machine cannot honour (a saved config elsewhere may still use them)."""
    import torch

    from cepo_kernels.backend import resolve_backend

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("device='cuda' is not allowed: no CUDA device is available here")
    device = torch.device("cuda" if cuda and cfg.device != "cpu" else "cpu")
    try:
        if cfg.kernel_backend == "triton":  # auto and torch run anywhere
            resolve_backend(cfg.kernel_backend, device)
    except ValueError as err:
        raise ConfigError(f"kernel_backend={cfg.kernel_backend!r} is not allowed on this "
                          f"machine: {err}; use auto or torch") from None
