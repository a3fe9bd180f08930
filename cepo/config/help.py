"""``python -m cepo.train --help``: every option with its type, paper default, offline default and
why (the trailing comment of its field in `cepo.config.schema`). Imports no torch and builds no
parser, so it prints in well under a second."""

from __future__ import annotations

import functools
import inspect
import re

from cepo.config.cli import _hints, _type_name, option_types
from cepo.config.presets import PRESETS, finalize, offline, paper
from cepo.config.schema import RENAMED, TrainConfig, flatten, to_dict


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in `cls`'s source (the help text)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs = {}
    for match in re.finditer(r"^\s+(\w+): [^\n]*?=[^\n]*?#\s*([^\n]+)$", source, re.MULTILINE):
        docs.setdefault(match.group(1), match.group(2).strip())
    return docs


def _section_docs(key: str) -> str:
    cls, parts = TrainConfig, key.split(".")
    for part in parts[:-1]:
        cls = _hints(cls)[part]
    return field_docs(cls).get(parts[-1], "")


def help_text(prog: str = "python -m cepo.train") -> str:
    """Every option with its type, its default (the paper preset) and the offline default."""
    paper_values = flatten(to_dict(finalize(paper())))
    offline_values = flatten(to_dict(finalize(offline())))
    lines = [
        f"usage: {prog} [--config FILE ...] [--preset {{{','.join(PRESETS)}}}] [--KEY VALUE ...]",
        "",
        "Train a Qwen3-VL policy with CEPO, RLSD or GRPO (docs/METHOD.md). Without arguments: the",
        "offline tiny run on the CPU (built-in tiny Qwen3-VL, synthetic data, a few minutes).",
        "",
        "  --config FILE   YAML file(s) of options (default: the offline tiny run)",
        "  --preset NAME   docs/METHOD.md, 'Presets' column the values start from: paper (default)",
        "                  or reference",
        "  --KEY VALUE     any option below, as a dotted key; the last part alone when unique;",
        "                  lists as comma-separated text; none clears an optional value",
        "",
        "option (type)  default = paper preset  [offline default when different]  why",
    ]
    section = None
    for key, tp in option_types().items():
        head = key.rpartition(".")[0]
        if head != section:
            section = head
            lines.append(f"\n[{head or 'run'}]")
        paper_value, offline_value = paper_values[key], offline_values[key]
        extra = f"  [{offline_value!r}]" if offline_value != paper_value else ""
        doc = _section_docs(key)
        lines.append(f"  --{key} ({_type_name(tp)})".ljust(44) + f" {paper_value!r}{extra}")
        if doc:
            lines.append(" " * 8 + doc)
    lines.append("\nrenamed options (the old names still work, with a warning):")
    lines += [f"  --{old} -> --{new}" for old, new in RENAMED.items()]
    return "\n".join(lines)


def exit_if_help(argv: list[str]) -> None:
    """Print the help and exit when `argv` asks for it (a bad command line exits with its one-line
    config error); called by ``python -m cepo.train`` before it imports torch."""
    from cepo.config.cli import parse_args
    from cepo.errors import ConfigError

    try:
        wants_help = parse_args(argv)[3]
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    if wants_help:
        print(help_text())
        raise SystemExit(0)
