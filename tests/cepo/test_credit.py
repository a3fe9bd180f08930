"""cepo.credit: the token credit map follows the stored w_t, escapes what it shows, and names the
steps it has when asked for one it has not."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
import yaml

from cepo import credit
from cepo.credit import CreditError, decisive_mask, display_token, weight_color

EPS = 0.5
HOSTILE = ['<script>alert(1)</script>', '" onmouseover="alert(2)', "&amp;", "</span>", "'"]


def record(step: int, tokens: list, **kw) -> dict:
    base = {"step": step, "rollout": 3, "problem": "What is 2 + 3?", "answer": "5",
            "wrong_answer": "6", "response": "".join(t[0] for t in tokens), "reward": 1.0,
            "advantage": 0.8, "teachers": True, "tokens": tokens}
    return {**base, **kw}


def make_run(tmp_path, records: list[dict], eps_w: float = EPS):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "samples.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"algo": "cepo", "cepo": {"eps_w": eps_w, "lambda_init": 0.5},
         "teacher": {"neg_fallback": "student"}}))
    return run


class Tokens(HTMLParser):
    """Collects every token box (class ``tok``): its attributes and visible text, and the
    second-row Â labels (class ``adv``), in document order."""

    def __init__(self):
        super().__init__()
        self.toks, self.advs, self.scripts, self._open = [], [], 0, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.scripts += tag == "script"
        cls = (a.get("class") or "").split()
        if "tok" in cls:
            self.toks.append({**a, "shown": ""})
            self._open = ("tok", 0)
        elif "adv" in cls:
            self.advs.append("")
            self._open = ("adv", 0)
        elif self._open and tag == "span":
            self._open = (self._open[0], self._open[1] + 1)

    def handle_endtag(self, tag):
        if self._open and tag == "span":
            kind, depth = self._open
            self._open = (kind, depth - 1) if depth else None

    def handle_data(self, data):
        if self._open and self._open[0] == "tok":
            self.toks[-1]["shown"] += data
        elif self._open and self._open[0] == "adv":
            self.advs[-1] += data


def parse(page: str) -> Tokens:
    p = Tokens()
    p.feed(page)
    return p


def background(style: str) -> str:
    return dict(part.split(":", 1) for part in style.split(";") if part)["background"]


def test_colour_scale_is_centred_on_one_and_clipped():
    # ColorBrewer RdBu end points, reversed; independent of the interpolation code
    assert weight_color(1.0, EPS) == "#f7f7f7"
    assert weight_color(1.5, EPS) == weight_color(9.0, EPS) == "#ca0020"
    assert weight_color(0.5, EPS) == weight_color(-3.0, EPS) == "#0571b0"
    assert weight_color(1.25, EPS) == "#f4a582"
    assert weight_color(1.1, 0.2) == "#f4a582"  # the scale follows ε_w
    rgb = [weight_color(0.5 + k / 20, EPS) for k in range(21)]
    redness = [int(c[1:3], 16) - int(c[5:7], 16) for c in rgb]
    assert redness == sorted(redness)  # blue to red: red minus blue never falls


def test_map_colours_follow_the_stored_weights(tmp_path):
    ws = [1.0, 1.5, 0.5, 1.37, 0.81, 1.02, 2.0, 0.0, 1.25]
    tokens = [[f"t{i}", 0.1 * i, w, 0.8 * (0.5 + 0.5 * w)] for i, w in enumerate(ws)]
    tokens += [["\\boxed{", 0.0, 1.0, 0.8], ["5", 2.0, 1.5, 1.0], ["}", 0.0, 1.0, 0.8],
               ["<|im_end|>", -0.2, 0.9, 0.76]]
    recs = [record(4, tokens), record(4, tokens[::-1], advantage=-0.8, rollout=5)]
    run = make_run(tmp_path, [record(2, tokens[:2])] + recs)
    files = credit.main([str(run), "--out", str(tmp_path / "map.html")])  # default: last step
    page = parse(files["html"].read_text(encoding="utf-8"))
    stored = [t for r in recs for t in r["tokens"]]
    assert [t["data-text"] for t in page.toks] == [t[0] for t in stored]
    assert [background(t["style"]) for t in page.toks] == [weight_color(t[2], EPS)
                                                           for t in stored]
    assert [float(t["data-w"]) for t in page.toks] == [t[2] for t in stored]
    assert page.advs == [f"{t[3]:+.2f}" for t in stored]
    assert page.toks[2]["style"].startswith("background:#0571b0")  # w = 0.5 = 1 − ε_w
    # only the boxed answer "5" is outlined as decisive
    assert [("dec" in t["class"]) for t in page.toks[:len(tokens)]] == \
        [t[0] == "5" for t in tokens]
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_special_tokens_and_whitespace_are_shown(tmp_path):
    assert display_token("<|im_end|>") == ("<|im_end|>", True)
    assert display_token(" a\n") == ("·a⏎", False)
    assert display_token("\t\x01") == ("⇥\\x01", False)
    assert display_token("") == ("∅", False)
    assert display_token("<|not special") == ("<|not·special", False)
    tokens = [[" x", 0, 1.0, 0.5], ["\n", 0, 1.0, 0.5], ["<|im_end|>", 0, 1.0, 0.5]]
    run = make_run(tmp_path, [record(1, tokens)])
    html_file = credit.main([str(run), "--out", str(tmp_path / "m"), "--format", "html"])["html"]
    page = html_file.read_text(encoding="utf-8")
    assert [t["shown"] for t in parse(page).toks] == ["·x", "⏎", "<|im_end|>"]
    assert '<span class="sp">&lt;|im_end|&gt;</span>' in page


def test_hostile_text_is_escaped(tmp_path):
    tokens = [[h, 0.0, 1.2, 0.9] for h in HOSTILE]
    rec = record(1, tokens, problem="<img src=x onerror=alert(3)>", answer="</td><b>",
                 wrong_answer="<script>", rollout="<i>7")
    run = make_run(tmp_path, [rec])
    page = credit.main([str(run), "--out", str(tmp_path / "m.html"), "--format", "html"])[
        "html"].read_text(encoding="utf-8")
    parsed = parse(page)
    assert parsed.scripts == 0 and "<img" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;img src=x onerror=alert(3)&gt;" in page
    assert [t["data-text"] for t in parsed.toks] == HOSTILE  # attributes round-trip exactly
    assert [t["shown"] for t in parsed.toks] == [display_token(h)[0] for h in HOSTILE]
    assert not any("onmouseover" in k for t in parsed.toks for k in t)


def test_missing_step_names_the_available_ones(tmp_path):
    tokens = [["a", 0, 1.0, 0.5]]
    run = make_run(tmp_path, [record(1, tokens), record(3, tokens), record(3, tokens)])
    with pytest.raises(SystemExit, match=r"step 2 is not in .*samples.jsonl; steps available: "
                                         r"1, 3"):
        credit.main([str(run), "--step", "2", "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m.html").exists() and not (tmp_path / "m.png").exists()
    one = credit.main([str(run), "--step", "3", "--rollouts", "1", "--format", "html",
                       "--out", str(tmp_path / "one")])["html"]
    assert len(parse(one.read_text(encoding="utf-8")).toks) == 1  # the first of step 3's two
    empty = make_run(tmp_path / "e", [])
    with pytest.raises(SystemExit, match="holds no samples"):
        credit.main([str(empty), "--out", str(tmp_path / "m")])


def test_bad_input_is_named(tmp_path):
    run = make_run(tmp_path, [record(1, [["a", 0, 1.0, 0.5]]), record(1, [["a", "x", 1, 0]])])
    with pytest.raises(CreditError, match=r"samples.jsonl:2: tokens\[0\] must be"):
        credit.load_samples(run)
    (run / "config.yaml").write_text("algo: cepo\ncepo: {eps_w: 2}\n")
    with pytest.raises(CreditError, match=r"config.yaml: cepo.eps_w must be a number in"):
        credit.load_config(run)
    (run / "samples.jsonl").unlink()
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("")
    (run / "samples.jsonl").symlink_to(outside)
    with pytest.raises(CreditError, match="points outside the run directory"):
        credit.load_samples(run)


def test_decisive_tokens_are_the_boxed_answer():
    assert decisive_mask(["So ", "\\box", "ed{", "4", "2", "}", "."]) == \
        [False, False, False, True, True, False, False]
    assert decisive_mask(["\\boxed{1}", " or ", "\\boxed{", "\\frac{1}{2}", "}"]) == \
        [False, False, False, True, False]  # the last box; nested braces stay inside
    assert decisive_mask(["ed{4", "}"]) == [False, False]  # no "\boxed{": no decisive token
    # an unclosed box runs to the end, special tokens excepted
    assert decisive_mask(["x \\boxed{7", "7", "<|im_end|>"]) == [True, True, False]
    assert decisive_mask([]) == []


def test_png_is_deterministic(tmp_path):
    tokens = [["\\boxed{", 0.0, 1.0, 0.8], ["5", 2.0, 1.5, 1.0], ["}", 0.0, 0.7, 0.7]]
    run = make_run(tmp_path, [record(1, tokens)])
    a = credit.main([str(run), "--out", str(tmp_path / "a.png"), "--format", "png"])["png"]
    b = credit.main([str(run), "--out", str(tmp_path / "b.png"), "--format", "png"])["png"]
    assert a.read_bytes() == b.read_bytes()
