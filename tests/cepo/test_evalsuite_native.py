"""The paper suite's native path: local copies in each benchmark's schema, graded with the
project's grader, sampled with the project's engine (top-k and presence penalty included)."""

from __future__ import annotations

import json

import pytest
import torch

from cepo.evalsuite import native
from cepo.evalsuite.benchmarks import BY_KEY, SamplingSettings
from cepo.rollout import EvalRolloutConfig, HFRolloutEngine, PresencePenalty
from tests.cepo.conftest import ScriptedRolloutEngine
from tests.cepo.evalsuite_fixtures import ROWS, write_benchmarks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_benchmarks(tmp_path_factory.mktemp("bench"))


def items_of(data_dir, key):
    return native.load_items(native.find_local(data_dir, BY_KEY[key]), BY_KEY[key])


def test_each_schema_loads_with_its_ids_answers_images_and_options(data_dir):
    dyn = items_of(data_dir, "dynamath")
    assert [i.qid for i in dyn] == ["1", "2"]
    assert [(i.answers, i.multiple_choice) for i in dyn] == [(("5",), False), (("B",), True)]
    assert dyn[0].example.images[0].getpixel((0, 0)) == (255, 0, 0)
    lv = items_of(data_dir, "logicvista")
    assert [i.qid for i in lv] == ["row-0", "row-1"] and lv[0].answers == ("A, C",)
    assert lv[0].example.images[0].getpixel((3, 3)) == (50, 60, 70)  # data URI
    mv = items_of(data_dir, "mathvision")
    assert not mv[0].multiple_choice and mv[1].options == ("3", "4", "5")
    assert mv[1].example.problem.endswith("Choices:\nA. 3\nB. 4\nC. 5")
    mm = items_of(data_dir, "mmmu")
    assert mm[0].example.problem == "[image 1] What is x?\nA. 1\nB. 2\nC. 3"
    assert mm[1].answers == ("0.5", "1/2") and len(mm[1].example.images) == 2
    assert [im.getpixel((0, 0)) for im in mm[1].example.images] == [(4, 5, 6), (7, 8, 9)]
    we = items_of(data_dir, "wemath")
    assert we[0].qid == "3steps_101" and we[0].example.problem.endswith("A. 3cm; B. 4cm; C. 5cm")
    assert we[0].example.images[0].getpixel((0, 0)) == (80, 90, 100)  # a file beside the data


def test_a_malformed_row_is_an_error_naming_file_row_and_field(tmp_path):
    rows = [dict(ROWS["wemath"][0])]
    del rows[0]["option"]
    (tmp_path / "wemath.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(KeyError, match=r"wemath.jsonl row 0 lacks field\(s\) \['option'\]"):
        items_of(tmp_path, "wemath")
    bad = {**ROWS["mmmu"][0], "image_1": None, "answer": "Z"}
    (tmp_path / "mmmu.jsonl").write_text(json.dumps({**bad, "image_1": "missing.png"}) + "\n")
    with pytest.raises(ValueError, match=(r"mmmu.jsonl row 0: field 'image_1' is not a usable "
                                          r"image \(bad image\)")):
        items_of(tmp_path, "mmmu")


@pytest.mark.parametrize("answer,options,want", [
    ("B", (), "B"), ("(B)", (), "B"), ("B.", (), "B"), ("B: 4", (), "B"),
    ("\\text{B}", (), "B"), ("A, C", (), "AC"), ("C,A", (), "AC"), ("4", ("3", "4"), "B"),
    ("5", ("3", "4"), None), ("Bob", (), None), (None, (), None),
])
def test_letters(answer, options, want):
    assert native.letters(answer, options) == want


RESPONSES = {  # (benchmark, qid) -> [(response, expected score)]
    ("dynamath", "1"): [("so \\boxed{5}", 1), ("\\boxed{5.0}", 1), ("\\boxed{6}", 0), ("5", 0)],
    ("dynamath", "2"): [("\\boxed{B}", 1), ("\\boxed{(B)}", 1), ("\\boxed{C}", 0)],
    ("logicvista", "row-0"): [("\\boxed{A, C}", 1), ("\\boxed{C,A}", 1), ("\\boxed{A}", 0)],
    ("logicvista", "row-1"): [("\\boxed{B}", 1), ("\\boxed{A}", 0)],
    ("mathvision", "7"): [("\\boxed{12}", 1), ("\\boxed{13}", 0)],
    ("mathvision", "8"): [("\\boxed{4}", 1), ("\\boxed{B. 4}", 1), ("\\boxed{A}", 0)],
    ("mmmu", "validation_Math_1"): [("\\boxed{C}", 1), ("\\boxed{3}", 1), ("\\boxed{B}", 0)],
    ("mmmu", "validation_Math_2"): [("\\boxed{\\frac{1}{2}}", 1), ("\\boxed{0.5}", 1),
                                    ("\\boxed{2}", 0)],
    ("wemath", "3steps_101"): [("\\boxed{B}", 1), ("\\boxed{4cm}", 0)],
}


def test_grading_of_known_responses_in_every_benchmark(data_dir, grader):
    for (key, qid), cases in RESPONSES.items():
        item = next(i for i in items_of(data_dir, key) if i.qid == qid)
        got = native.grade([item] * len(cases), [text for text, _ in cases], grader)
        assert got == [float(s) for _, s in cases], (key, qid)


def test_score_items_groups_k_samples_per_question(data_dir, processor, grader):
    """A scripted engine answers with known responses: every question gets its k scores."""
    items = items_of(data_dir, "mathvision")
    script = {"7": ["\\boxed{12}", "no", "\\boxed{12}"], "8": ["\\boxed{A}", "\\boxed{4}", "x"]}
    engine = ScriptedRolloutEngine(processor, lambda p: script[p.example.uid])
    scores, too_long = native.score_items(
        items, None, processor, settings=SamplingSettings(max_new_tokens=8), samples=3,
        grader=grader, batch_size=1, engine=engine)
    assert scores == {"7": [1.0, 0.0, 1.0], "8": [0.0, 1.0, 0.0]} and too_long == []


def test_prompts_beyond_max_model_len_score_zero_on_every_sample(data_dir, processor, grader):
    items = items_of(data_dir, "dynamath")
    engine = ScriptedRolloutEngine(processor, lambda p: ["\\boxed{5}"] * 2)
    settings = SamplingSettings(max_new_tokens=8, max_model_len=10)  # no prompt fits in 2
    scores, too_long = native.score_items(items, None, processor, settings=settings, samples=2,
                                          grader=grader, engine=engine)
    assert scores == {"1": [0.0, 0.0], "2": [0.0, 0.0]} and too_long == ["1", "2"]


def test_presence_penalty_matches_a_direct_computation():
    torch.manual_seed(0)
    scores = torch.randn(2, 10)
    input_ids = torch.tensor([[7, 8, 1, 1, 3], [9, 9, 4, 5, 4]])  # prompt width 2
    got = PresencePenalty(2.0, prompt_width=2)(input_ids, scores.clone())
    want = scores.clone()
    want[0, [1, 3]] -= 2.0  # 7, 8 are prompt tokens: not penalised; 1 counted once
    want[1, [4, 5]] -= 2.0
    torch.testing.assert_close(got, want)
    assert torch.equal(PresencePenalty(2.0, 5)(input_ids, scores), scores)  # nothing generated


def test_top_k_1_sampling_is_greedy(model, processor, data_dir):
    """top_k reaches `generate`: with k = 1, sampling at T = 1 is the argmax path."""
    from cepo.data import encode_prompt

    prompts = [encode_prompt(processor, i.example) for i in items_of(data_dir, "dynamath")]
    engine = HFRolloutEngine(model, processor)
    greedy = engine.generate(prompts, EvalRolloutConfig(group_size=1, temperature=0.0,
                                                        max_new_tokens=6))
    torch.manual_seed(1)
    top1 = engine.generate(prompts, EvalRolloutConfig(group_size=2, temperature=1.0, top_k=1,
                                                      max_new_tokens=6))
    assert top1.texts == [t for t in greedy.texts for _ in range(2)]
    torch.manual_seed(1)
    free = engine.generate(prompts, EvalRolloutConfig(group_size=2, temperature=1.0,
                                                      max_new_tokens=6))
    assert free.texts != top1.texts  # the tiny model's sampling is not greedy without top-k


def test_suite_on_local_copies_end_to_end(tiny_dir, data_dir, tmp_path):
    """`python -m cepo.eval --suite paper --data-dir`: the tiny model on all five benchmarks."""
    from cepo.eval import main

    out = tmp_path / "out"
    summary = main(["--suite", "paper", "--model", tiny_dir, "--data-dir", str(data_dir),
                    "--samples", "2", "--max_new_tokens", "4", "--device", "cpu",
                    "--output", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "native" and results["samples"] == 2
    assert results["settings"]["top_k"] == 40 and results["settings"]["presence_penalty"] == 2.0
    for key, rows in ROWS.items():
        scores = results["benchmarks"][key]["scores"]
        assert len(scores) == len(rows)
        assert all(len(s) == 2 and set(s) <= {0.0, 1.0} for s in scores.values())
        flat = [v for s in scores.values() for v in s]
        assert summary[key]["mean"] == pytest.approx(100 * sum(flat) / len(flat))
        assert summary[key]["n"] == len(rows)
    table = (out / "table.md").read_text()
    for title in ("DynaMath", "LogicVista", "MathVision-mini", "MMMU", "WeMath", "Avg"):
        assert title in table
    assert "No paper numbers" in table  # the tiny model has no row in the paper


def test_presence_penalty_reaches_generate(model, processor, data_dir):
    """A huge penalty forbids repeating any generated token; without it the tiny model repeats."""
    from cepo.data import encode_prompt

    prompts = [encode_prompt(processor, i.example) for i in items_of(data_dir, "mmmu")]
    engine = HFRolloutEngine(model, processor)

    def repeats(config):
        out = engine.generate(prompts, config)
        rows = [ids[m.bool()].tolist() for ids, m in zip(out.response_ids, out.response_mask)]
        return sum(len(r) - len(set(r)) for r in rows)

    assert repeats(EvalRolloutConfig(group_size=1, temperature=0.0, max_new_tokens=24)) > 0
    assert repeats(EvalRolloutConfig(group_size=1, temperature=0.0, max_new_tokens=24,
                                     presence_penalty=1e4)) == 0
