"""How the credit maps show a token (`cepo.credit` for HTML, `cepo.credit_png` for PNG): the
colour of a weight, readable text on it, visible whitespace, the decisive answer tokens.
"""

from __future__ import annotations

import re

# ColorBrewer RdBu (5 classes), reversed: blue below 1 (less credit), red above (more).
STOPS = ("#0571b0", "#92c5de", "#f7f7f7", "#f4a582", "#ca0020")
SPECIAL = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")
VISIBLE = {"\n": "⏎", "\t": "⇥", " ": "·", "\r": "␍"}


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def weight_color(w: float, eps_w: float) -> str:
    """``#rrggbb`` for weight `w`: `STOPS` interpolated over [1 − ε_w, 1 + ε_w], clipped."""
    t = min(max((w - 1.0) / eps_w, -1.0), 1.0)  # -1 .. 1
    pos = (t + 1.0) / 2.0 * (len(STOPS) - 1)
    i = min(int(pos), len(STOPS) - 2)
    frac = pos - i
    lo, hi = _rgb(STOPS[i]), _rgb(STOPS[i + 1])
    return "#" + "".join(f"{round(a + (b - a) * frac):02x}" for a, b in zip(lo, hi))


def text_color(background: str) -> str:
    """Black or white, whichever reads better on `background`."""
    r, g, b = _rgb(background)
    return "#ffffff" if 0.299 * r + 0.587 * g + 0.114 * b < 140 else "#111111"


def display_token(text: str) -> tuple[str, bool]:
    """(label, special): whitespace made visible (⏎ ⇥ · ␍), other control characters as
    ``\\xNN``, an empty token as ∅; a whole special token such as ``<|im_end|>`` kept as is."""
    if SPECIAL.fullmatch(text):
        return text, True
    if not text:
        return "∅", False
    out = []
    for ch in text:
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out), False


def decisive_mask(texts: list[str]) -> list[bool]:
    """Which tokens carry the final answer: those overlapping the content of the last
    ``\\boxed{...}`` of the concatenated response (braces balanced; an unclosed box runs to
    the end), special tokens such as ``<|im_end|>`` excepted. No box: no decisive token."""
    full = "".join(texts)
    start = full.rfind("\\boxed{")
    if start < 0:
        return [False] * len(texts)
    lo = start + len("\\boxed{")
    depth, hi = 1, len(full)
    for j in range(lo, len(full)):
        depth += {"{": 1, "}": -1}.get(full[j], 0)
        if depth == 0:
            hi = j
            break
    out, pos = [], 0
    for t in texts:
        out.append(pos < hi and pos + len(t) > lo and not SPECIAL.fullmatch(t))
        pos += len(t)
    return out


def fmt_adv(a: float) -> str:
    return f"{a:+.2f}"


def negative_hint(rec: dict, cfg: dict) -> str:
    if rec.get("wrong_answer") is not None:
        return rec["wrong_answer"]
    return f"none in the group: T− = {cfg['neg_fallback']} fallback"
