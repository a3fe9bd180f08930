"""The token credit map as a PNG (for a README), drawn with matplotlib; no browser needed.

Same content and colours as the HTML of cepo.credit (`weight_color`, `display_token`,
`decisive_mask`), laid out on a monospace character grid: one data unit is one character's
advance, so token boxes and text line up without measuring rendered text. Bundled DejaVu Sans
Mono, no timestamps in the file: the same samples give the same bytes on the same matplotlib.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from cepo.credit_style import (
    decisive_mask,
    display_token,
    fmt_adv,
    negative_hint,
    text_color,
    weight_color,
)

FONT = "DejaVu Sans Mono"
SIZE = 10.0  # points
ADVANCE = 0.602  # DejaVu Sans Mono: 1233/2048 em per character
LINE = 1.6  # line height in em
WIDTH = 110  # characters per line


def _layout_tokens(tokens: list, width: int) -> list[tuple[int, int, int]]:
    """(row, column, cells) per token: a cell is as wide as the wider of token and Â label."""
    row, col, out = 0, 0, []
    for text, _d, _w, a in tokens:
        cells = max(len(display_token(text)[0]), len(fmt_adv(a))) + 1
        if col and col + cells > width:
            row, col = row + 1, 0
        out.append((row, col, cells))
        col += cells
    return out


def _header(rec: dict, cfg: dict) -> list[str]:
    lines = [f"rollout #{rec.get('rollout')}   reward {rec['reward']:.3f}   "
             f"advantage A {rec['advantage']:+.4f}"
             + ("" if rec.get("teachers", True) else "   (not teacher-scored: w = 1)")]
    for key, value in (("prompt", rec["problem"]),
                       ("ground truth, T+ hint (r+)", rec["answer"]),
                       ("wrong answer, T− hint (r−)", negative_hint(rec, cfg))):
        text = f"{key}: {value}".replace("\n", " ⏎ ")
        lines += textwrap.wrap(text, WIDTH, subsequent_indent="    ") or [key + ":"]
    return lines


def render_png(records: list[dict], cfg: dict, step: int, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    eps = cfg["eps_w"]
    blocks = []
    for rec in records:
        head = _header(rec, cfg)
        places = _layout_tokens(rec["tokens"], WIDTH)
        rows = (places[-1][0] + 1) if places else 0
        blocks.append((rec, head, places, len(head) + 2 * rows + 1.5))
    total = 4.5 + sum(b[3] for b in blocks)
    char_in, line_in = ADVANCE * SIZE / 72, LINE * SIZE / 72
    fig = plt.figure(figsize=((WIDTH + 2) * char_in, total * line_in), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-1, WIDTH + 1)
    ax.set_ylim(total, 0)
    ax.axis("off")

    def put(x, y, s, **kw):
        kw = {"family": FONT, "size": SIZE, "va": "center", "parse_math": False, **kw}
        ax.text(x, y, s, **kw)

    put(0, 0.7, f"Token credit map · step {step} · {cfg['algo']} · ε_w = {eps:g}   "
        "Â_t = A·[(1−λ) + λ·w_t]", weight="bold")
    # legend: the colour scale over [1 − ε_w, 1 + ε_w], 40 characters wide
    n = 40
    for k in range(n):
        w = 1 - eps + 2 * eps * (k + 0.5) / n
        ax.add_patch(Rectangle((4 + k, 1.6), 1, 0.8, color=weight_color(w, eps), lw=0))
    ax.add_patch(Rectangle((4, 1.6), n, 0.8, fill=False, ec="#888888", lw=0.6))
    put(0, 2.0, "w_t")
    for frac in (0, 0.25, 0.5, 0.75, 1):
        put(4 + n * frac, 2.9, f"{1 - eps + 2 * eps * frac:g}", ha="center", size=SIZE * 0.8)
    put(n + 6, 2.0, "blue < 1: |Â_t| shrinks · red > 1: |Â_t| grows · white: filler",
        size=SIZE * 0.9)
    put(n + 6, 3.0, "second row: Â_t · framed: the answer inside \\boxed{}", size=SIZE * 0.9,
        color="#444444")

    y = 4.5
    for rec, head, places, height in blocks:
        for i, line in enumerate(head):
            put(0, y + 0.5 + i, line, weight="bold" if i == 0 else "normal",
                color="#111111" if i == 0 else "#333333")
        top = y + len(head) + 0.3
        decisive = decisive_mask([t[0] for t in rec["tokens"]])
        for (text, _d, w, a), (row, col, cells), dec in zip(rec["tokens"], places, decisive):
            label, special = display_token(text)
            bg = weight_color(w, eps)
            ty = top + 2 * row
            ax.add_patch(Rectangle((col, ty), cells - 0.3, 1.0, facecolor=bg,
                                   edgecolor="#111111" if dec else bg, lw=1.4 if dec else 0))
            cx = col + (cells - 0.3) / 2
            if special:
                put(cx, ty + 0.5, label, ha="center", size=SIZE * 0.7, color="#666666")
            else:
                put(cx, ty + 0.5, label, ha="center", color=text_color(bg))
            put(cx, ty + 1.45, fmt_adv(a), ha="center", size=SIZE * 0.7, color="#444444")
        ax.plot([-0.5, WIDTH + 0.5], [y + height - 0.4] * 2, color="#cccccc", lw=0.6)
        y += height
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
