"""Token credit map: where a step's credit went, token by token.

    python -m cepo.credit RUN_DIR [--step K] --out FILE

reads ``RUN_DIR/samples.jsonl`` (cepo.samples: per step, the best and worst rollout of the first
groups that mix rewards, with each response token's Δ_t, w_t and Â_t) and writes FILE.html (self-
contained: inline CSS, no script, no network) and FILE.png (matplotlib, for a README). Each
response token is coloured by its weight w_t on a diverging scale centred on 1 and clipped to
1 ± ε_w (ε_w from the run's config.yaml); Â_t sits in a second row and, with w_t and Δ_t, in the
token's tooltip. The header of each rollout gives the prompt, the ground truth r+ (teacher T+'s
hint), the wrong answer r− (teacher T−'s hint), the reward and the sequence advantage A.
The answer inside the response's last ``\\boxed{...}`` (the *decisive* tokens, `decisive_mask`)
is outlined. Nothing read here is executed: JSON and YAML (safe_load) only.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from cepo.credit_style import (
    VISIBLE,
    decisive_mask,
    display_token,
    fmt_adv,
    negative_hint,
    text_color,
    weight_color,
)
from cepo.samples import SAMPLES_FILE

CONFIG_FILE = "config.yaml"


class CreditError(ValueError):
    """Unreadable run directory or samples file: the message names the file, line and field."""


# --------------------------------------------------------------------------- reading


def _inside(run_dir: Path, name: str) -> Path:
    """``run_dir/name``, refusing a link that leads out of the run directory."""
    path = run_dir / name
    if not path.is_file():
        raise CreditError(f"{path}: no such file (is {run_dir} a cepo.train run directory?)")
    if not path.resolve().is_relative_to(run_dir.resolve()):
        raise CreditError(f"{path} points outside the run directory ({path.resolve()})")
    return path


def _number(rec: dict, key: str, where: str) -> float:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CreditError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return float(value)


def check_record(rec: Any, where: str) -> dict[str, Any]:
    """One samples.jsonl record, its fields type-checked (`where` is ``file:line``)."""
    if not isinstance(rec, dict):
        raise CreditError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    step = rec.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise CreditError(f"{where}: field 'step' must be an integer, got {step!r}")
    for key in ("problem", "answer", "response"):
        if not isinstance(rec.get(key), str):
            raise CreditError(f"{where}: field {key!r} must be a string, got {rec.get(key)!r}")
    if rec.get("wrong_answer") is not None and not isinstance(rec["wrong_answer"], str):
        raise CreditError(f"{where}: field 'wrong_answer' must be a string or null, "
                          f"got {rec['wrong_answer']!r}")
    for key in ("reward", "advantage"):
        _number(rec, key, where)
    tokens = rec.get("tokens")
    if not isinstance(tokens, list):
        raise CreditError(f"{where}: field 'tokens' must be a list, got {tokens!r}")
    for i, tok in enumerate(tokens):
        ok = (isinstance(tok, list) and len(tok) == 4 and isinstance(tok[0], str)
              and all(not isinstance(v, bool) and isinstance(v, int | float)
                      and math.isfinite(v) for v in tok[1:]))
        if not ok:
            raise CreditError(f"{where}: tokens[{i}] must be [text, Δ, w, Â] (a string and "
                              f"three finite numbers), got {tok!r}")
    return rec


def load_samples(run_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """``{step: [record, ...]}`` from ``run_dir/samples.jsonl``, in file order."""
    path = _inside(Path(run_dir), SAMPLES_FILE)
    steps: dict[int, list[dict[str, Any]]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise CreditError(f"{where}: not valid JSON ({err.msg})") from None
        rec = check_record(rec, where)
        steps.setdefault(rec["step"], []).append(rec)
    return steps


def load_config(run_dir: str | Path) -> dict[str, Any]:
    """What the map needs from the run's config.yaml: algo, ε_w, the r− fallback."""
    path = _inside(Path(run_dir), CONFIG_FILE)
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise CreditError(f"{path}: not valid YAML ({err})") from None
    cepo = cfg.get("cepo") if isinstance(cfg, dict) else None
    eps = cepo.get("eps_w") if isinstance(cepo, dict) else None
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        raise CreditError(f"{path}: cepo.eps_w must be a number in (0, 1), got {eps!r}")
    teacher = cfg.get("teacher") if isinstance(cfg.get("teacher"), dict) else {}
    return {"algo": str(cfg.get("algo", "?")), "eps_w": float(eps),
            "neg_fallback": str(teacher.get("neg_fallback", "student"))}


def pick_step(steps: dict[int, list], step: int | None, source: str) -> int:
    """`step`, or the last one logged; a step that is not there names the ones that are."""
    if not steps:
        raise CreditError(f"{source} holds no samples (log.samples_per_step = 0, or no step had "
                          "a group with mixed rewards)")
    if step is None:
        return max(steps)
    if step not in steps:
        raise CreditError(f"step {step} is not in {source}; steps available: "
                          f"{', '.join(map(str, sorted(steps)))} (a step whose groups all had "
                          "equal rewards logs no samples)")
    return step


# --------------------------------------------------------------------------- colour and tokens


# --------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#111;background:#fff;max-width:1160px}
h1{font-size:18px;margin:0 0 4px}
.sub{color:#555;font-size:13px;margin-bottom:12px}
.legend{display:flex;align-items:flex-start;gap:10px;font-size:12px;margin:8px 0 16px}
.key{color:#333;line-height:1.5}
.bar{width:320px;height:14px;border:1px solid #999;background:linear-gradient(to right,GRAD)}
.ticks{display:flex;justify-content:space-between;width:322px;font-size:11px;color:#333}
.card{border:1px solid #ccc;border-radius:6px;padding:10px 12px;margin-bottom:14px}
table.h{border-collapse:collapse;font-size:13px;margin-bottom:8px}
table.h th{text-align:left;color:#555;font-weight:600;padding:1px 10px 1px 0;vertical-align:top}
table.h td{padding:1px 0;white-space:pre-wrap}
code{background:#f2f2f2;padding:0 3px;border-radius:3px}
.toks{line-height:1.1;font-family:'DejaVu Sans Mono',Menlo,monospace;font-size:14px}
.cell{display:inline-block;text-align:center;margin:0 5px 8px 0;vertical-align:top}
.tok{display:block;padding:2px 3px;border-radius:3px;white-space:pre;min-width:10px}
.dec{outline:2px solid #111;outline-offset:-2px}
.adv{display:block;font-size:10px;color:#444;padding-top:1px}
.ws{opacity:.55}
.sp{font-size:10px;color:#666;border:1px solid #aaa;border-radius:3px;padding:0 2px}
"""


def _token_html(text: str, delta: float, w: float, adv: float, eps_w: float,
                decisive: bool) -> str:
    label, special = display_token(text)
    bg = weight_color(w, eps_w)
    if special:
        inner = f'<span class="sp">{html.escape(label)}</span>'
    else:
        inner = "".join(f'<span class="ws">{html.escape(c)}</span>' if c in VISIBLE.values()
                        else html.escape(c) for c in label)
    tip = f"w={w:.3f}  Â={adv:+.4f}  Δ={delta:+.3f}" + ("  (decisive)" if decisive else "")
    cls = "tok dec" if decisive else "tok"
    return (f'<span class="cell" title="{html.escape(tip)}"><span class="{cls}" '
            f'style="background:{bg};color:{text_color(bg)}" data-text="{html.escape(text)}" '
            f'data-w="{w!r}" data-adv="{adv!r}">{inner}</span>'
            f'<span class="adv">{html.escape(fmt_adv(adv))}</span></span>')


def _card_html(rec: dict, cfg: dict) -> str:
    tokens = rec["tokens"]
    dec = decisive_mask([t[0] for t in tokens])
    rows = [("prompt", html.escape(rec["problem"])),
            ("ground truth, T+ hint (r+)", f"<code>{html.escape(rec['answer'])}</code>"),
            ("wrong answer, T− hint (r−)", f"<code>{html.escape(negative_hint(rec, cfg))}</code>"),
            ("reward · advantage A", f"{rec['reward']:.3f} · {rec['advantage']:+.4f}"
             + ("" if rec.get("teachers", True) else " (not teacher-scored: w ≡ 1)"))]
    head = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    cells = "".join(_token_html(t, d, w, a, cfg["eps_w"], x)
                    for (t, d, w, a), x in zip(tokens, dec))
    number = html.escape(str(rec.get("rollout")))
    return (f'<div class="card"><table class="h"><tr><th>rollout</th><td>#{number}</td></tr>'
            f'{head}</table><div class="toks">{cells}</div></div>')


def render_html(records: list[dict], cfg: dict, step: int, source: str) -> str:
    """The self-contained page for one step's records."""
    eps = cfg["eps_w"]
    grad = ",".join(weight_color(1 - eps + 2 * eps * k / 20, eps) for k in range(21))
    ticks = "".join(f"<span>{v:g}</span>" for v in (1 - eps, 1 - eps / 2, 1, 1 + eps / 2, 1 + eps))
    legend = (f'<div class="legend"><span>w<sub>t</sub></span><div><div class="bar"></div>'
              f'<div class="ticks">{ticks}</div></div><div class="key">blue: w<sub>t</sub> &lt; 1,'
              " |Â<sub>t</sub>| shrinks · red: w<sub>t</sub> &gt; 1, |Â<sub>t</sub>| grows "
              "(more credit when A &gt; 0, more blame when A &lt; 0) · white: 1, filler<br>"
              "second row: Â<sub>t</sub> · outlined: the answer inside \\boxed{} "
              "(decisive tokens) · hover a token for w<sub>t</sub>, Â<sub>t</sub>, Δ<sub>t</sub>"
              "</div></div>")
    title = f"Token credit map · step {step} · {cfg['algo']}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS.replace('GRAD', grad)}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><div class=\"sub\">"
            f"{html.escape(source)} · weight clip ε<sub>w</sub> = {eps:g} · "
            f"Â<sub>t</sub> = A·[(1−λ) + λ·w<sub>t</sub>]</div>{legend}"
            + "".join(_card_html(r, cfg) for r in records) + "</body></html>\n")


# --------------------------------------------------------------------------- CLI


def outputs(out: Path, formats: str) -> dict[str, Path]:
    """``--out credit.html`` (or ``credit.png`` or ``credit``) -> the files to write."""
    stem = out.with_suffix("") if out.suffix.lower() in (".html", ".png") else out
    wanted = ("html", "png") if formats == "both" else (formats,)
    return {f: stem.with_name(stem.name + "." + f) for f in wanted}


def main(argv: list[str] | None = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(prog="python -m cepo.credit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a cepo.train output directory")
    p.add_argument("--step", type=int, default=None, help="training step (default: the last "
                   "one in samples.jsonl)")
    p.add_argument("--out", type=Path, required=True,
                   help="output file; .html and .png are written next to each other")
    p.add_argument("--format", choices=("both", "html", "png"), default="both",
                   help="which files to write (default: both)")
    p.add_argument("--rollouts", type=int, default=None,
                   help="show only the step's first N logged rollouts (default: all)")
    args = p.parse_args(argv)
    try:
        steps = load_samples(args.run_dir)
        cfg = load_config(args.run_dir)
        step = pick_step(steps, args.step, str(args.run_dir / SAMPLES_FILE))
    except CreditError as err:
        raise SystemExit(f"cepo.credit: {err}") from None
    if args.rollouts is not None and args.rollouts < 1:
        raise SystemExit(f"cepo.credit: --rollouts must be >= 1, got {args.rollouts}")
    files = outputs(args.out, args.format)
    records, source = steps[step][: args.rollouts], f"{args.run_dir} step {step}"
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    if "html" in files:
        files["html"].write_text(render_html(records, cfg, step, source), encoding="utf-8")
    if "png" in files:
        from cepo.credit_png import render_png

        render_png(records, cfg, step, files["png"])
    for path in files.values():
        print(f"wrote {path}")
    return files


if __name__ == "__main__":
    main(sys.argv[1:])
