"""The CEPO advantage step on verl-shaped rows (`cepo.integrations.verl.step`, no verl needed):
r- choice per uid, the teacher-row layout, Â against the written-out formula, the fallbacks."""

from __future__ import annotations

import pytest
import torch

from cepo.errors import ConfigError
from cepo.grading import extract_boxed
from cepo.integrations.verl.options import options_from_config
from cepo.integrations.verl.step import Rows, plan_teachers, reweight, teacher_fields
from tests.integrations.verl_helpers import (
    GROUPS,
    CharTokenizer,
    expected_a_hat,
    expected_grpo,
    verl_rows,
)

TOK = CharTokenizer()


def make_rows(seed: int = 0) -> tuple[Rows, list[dict]]:
    raw = verl_rows(TOK)
    width = max(len(r["responses"]) for r in raw)
    adv = torch.zeros(len(raw), width)
    by_group: dict[str, list[int]] = {}
    for i, r in enumerate(raw):
        by_group.setdefault(r["uid"], []).append(i)
    for ix in by_group.values():
        ix = sorted(ix, key=lambda i: raw[i]["key"])
        for i, a in zip(ix, expected_grpo([float(raw[i]["rm_scores"].sum()) for i in ix])):
            adv[i, : len(raw[i]["responses"])] = a * raw[i]["response_mask"]
    student = -torch.rand(len(raw), width, generator=torch.Generator().manual_seed(seed)) * 3
    texts = TOK.batch_decode([r["responses"].tolist() for r in raw])
    rows = Rows(
        uids=[r["uid"] for r in raw], prompts=[r["prompts"] for r in raw],
        responses=[r["responses"] for r in raw], response_mask=[r["response_mask"] for r in raw],
        advantages=adv, student_logprobs=student,
        scores=torch.tensor([float(r["rm_scores"].sum()) for r in raw]),
        ground_truths=[r["reward_model"]["ground_truth"] for r in raw],
        answers=[extract_boxed(t) for t in texts],
        accuracy=[r["extra_fields"]["reward_extra_info"]["acc"] for r in raw], texts=texts,
        order=[int(r["key"].split("_")[1]) for r in raw])
    return rows, raw


def fake_logprobs(plan, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(len(r.responses), generator=g) * 3 for r in plan.rows]


def test_wrong_answer_choice_per_uid_in_any_row_order():
    rows, _ = make_rows()
    plan = plan_teachers(rows, options_from_config({}), TOK)
    # g0: the two rejected rollouts tie on reward; the first sampled one ("5") wins
    assert plan.wrong == {"g0": ["5"], "g1": [], "g2": []}


def test_teacher_rows_are_prompt_hint_response_positive_rows_first():
    rows, raw = make_rows()
    plan = plan_teachers(rows, options_from_config({}), TOK)
    scored = [i for i, r in enumerate(raw) if r["uid"] in ("g0", "g1")]  # g2 has A = 0
    assert plan.scored.nonzero().flatten().tolist() == scored
    kinds = [(r.kind, r.source) for r in plan.rows]
    with_neg = [i for i in scored if raw[i]["uid"] == "g0"]
    assert kinds == [("pos", i) for i in scored] + [("neg0", i) for i in with_neg]
    fields = teacher_fields(plan)
    for row, ids, pos in zip(plan.rows, fields["input_ids"], fields["position_ids"]):
        src = raw[row.source]
        answer = GROUPS[src["uid"]][1] if row.kind == "pos" else "5"
        expected = torch.cat([src["prompts"], TOK.encode(" " + answer), src["responses"]])
        assert torch.equal(ids, expected)
        assert torch.equal(pos, torch.arange(len(expected)))
        assert torch.equal(row.response_mask, src["response_mask"])


@pytest.mark.parametrize("fallback", ["student", "positive"])
def test_a_hat_matches_the_formula_with_fallback_groups(fallback):
    rows, raw = make_rows()
    options = options_from_config({"neg_fallback": fallback, "eps_w": 0.3})
    plan = plan_teachers(rows, options, TOK)
    lps = fake_logprobs(plan)
    result = reweight(rows, plan, lps, options, lam=0.4)
    pos = {r.source: lp for r, lp in zip(plan.rows, lps) if r.kind == "pos"}
    neg = {r.source: lp for r, lp in zip(plan.rows, lps) if r.kind == "neg0"}
    weights = []  # the clipped w_t of every teacher-scored token
    for i, r in enumerate(raw):
        t = len(r["responses"])
        mask = r["response_mask"].bool()
        a = float(rows.advantages[i, :t][mask][0])
        got = result.advantages[i, :t]
        if r["uid"] == "g2":  # A = 0: no teachers, Â = 0
            assert torch.equal(got, torch.zeros(t))
            continue
        if i in neg:
            t_neg = neg[i]
        else:  # g1: no r-
            t_neg = rows.student_logprobs[i, :t] if fallback == "student" else pos[i]
        want = torch.where(mask, expected_a_hat(a, pos[i], t_neg, 0.4, 0.3), 0.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        w = expected_a_hat(1.0 if a > 0 else -1.0, pos[i], t_neg, 1.0, 0.3).abs()
        weights.append(w[mask])
    assert result.metrics["cepo/rows_fallback"] == 3.0  # the three rows of g1
    assert result.metrics["cepo/weight_mean"] == pytest.approx(torch.cat(weights).mean().item())
    assert result.metrics["cepo/frac_groups_with_neg"] == 0.5  # g0 of the mixed g0, g1


def test_rlsd_scores_only_the_positive_teacher():
    rows, _ = make_rows()
    options = options_from_config({"algo": "rlsd"})
    plan = plan_teachers(rows, options, TOK)
    assert {r.kind for r in plan.rows} == {"pos"}
    assert options.eps_w == 0.2 and options.lam(1) == pytest.approx(0.48)  # the RLSD defaults
    result = reweight(rows, plan, fake_logprobs(plan), options, lam=0.48)
    assert torch.equal(result.neg_logprobs, rows.student_logprobs)


def test_two_wrong_answers_mix_as_logmeanexp():
    rows, _ = make_rows()
    options = options_from_config({"num_neg": 2})
    plan = plan_teachers(rows, options, TOK)
    assert plan.wrong["g0"] == ["5", "6"]
    lps = fake_logprobs(plan)
    result = reweight(rows, plan, lps, options, lam=0.5)
    (i, *_), = [[r.source for r in plan.rows if r.kind == "neg0"]]
    n0 = next(lp for r, lp in zip(plan.rows, lps) if r.kind == "neg0" and r.source == i)
    n1 = next(lp for r, lp in zip(plan.rows, lps) if r.kind == "neg1" and r.source == i)
    want = torch.log((n0.double().exp() + n1.double().exp()) / 2)
    torch.testing.assert_close(result.neg_logprobs[i, : len(n0)].double(), want)


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="cepo.lam_0"):
        options_from_config({"lam_0": 0.3})
    with pytest.raises(ConfigError, match="neg_choice"):
        options_from_config({"neg_choice": "best"})
    with pytest.raises(ConfigError, match="cepo.algo"):
        options_from_config({"algo": "grpo"})


def test_wrong_number_of_teacher_logprobs_is_refused():
    rows, _ = make_rows()
    options = options_from_config({})
    plan = plan_teachers(rows, options, TOK)
    with pytest.raises(ValueError, match="teacher log-prob rows"):
        reweight(rows, plan, fake_logprobs(plan)[:-1], options, lam=0.5)


def rope_index(ids: list[int], image_token: int, grid: list[int]) -> torch.Tensor:
    """[3, L] M-RoPE positions from transformers' own Qwen3-VL rope index (spatial merge 2)."""
    import functools
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    owner = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(spatial_merge_size=2)))
    owner.get_vision_position_ids = functools.partial(Qwen3VLModel.get_vision_position_ids, owner)
    x = torch.tensor([ids])
    pos, _ = Qwen3VLModel.get_rope_index(owner, x, (x == image_token).int(),
                                        image_grid_thw=torch.tensor([grid]))
    return pos[:, 0]


def test_teacher_positions_are_the_rope_index_of_the_longer_prompt():
    """A teacher row keeps the student's image: its M-RoPE positions (verl stores a text row
    above the three M-RoPE rows) must be what the model's rope index gives prompt + hint."""
    from cepo.integrations.verl.step import teacher_position_ids

    img = 7
    prompt = [10, 11, 3] + [img] * 6 + [4, 12, 13]  # a 1x4x6 patch grid: 2x3 merged tokens
    hint, response = [30, 31, 32], [20, 21, 22, 23]
    student = rope_index(prompt + response, img, [1, 4, 6])
    want = rope_index(prompt + hint + response, img, [1, 4, 6])
    assert not torch.equal(want[1], torch.arange(want.shape[1]))  # really a 2-D image grid
    got = teacher_position_ids(student, len(prompt), len(hint), len(response))
    assert torch.equal(got, want)
    text_row = torch.arange(student.shape[1])[None]
    got4 = teacher_position_ids(torch.cat([text_row, student]), len(prompt), len(hint),
                                len(response))
    assert torch.equal(got4, torch.cat([torch.arange(want.shape[1])[None], want]))
    assert torch.equal(teacher_position_ids(None, 3, 2, 4), torch.arange(9))
    broken = student.clone()
    broken[:, -1] += 5
    with pytest.raises(ValueError, match="not consecutive"):
        teacher_position_ids(broken, len(prompt), len(hint), len(response))


def test_teacher_rows_keep_the_images():
    rows, raw = make_rows()
    images = [{"pixel_values": torch.full((4, 3), float(i)), "image_grid_thw":
               torch.tensor([[1, 2, 2]])} for i in range(len(raw))]
    rows.multi_modal_inputs = images
    plan = plan_teachers(rows, options_from_config({}), TOK)
    fields = teacher_fields(plan)
    assert [m["pixel_values"][0, 0].item() for m in fields["multi_modal_inputs"]] == \
        [float(r.source) for r in plan.rows]


def test_image_blind_teachers_replace_the_placeholders():
    """teacher_images=False: the reference's image-blind teacher (pad tokens, no pixels, text
    positions in every position row)."""
    rows, raw = make_rows()
    img = TOK.encode("?").item()  # stands for the image placeholder token
    rows.multi_modal_inputs = [{"pixel_values": torch.ones(4, 3)} for _ in raw]
    rows.position_ids = [torch.stack([torch.arange(len(r["input_ids"]))] * 4) for r in raw]
    options = options_from_config({"teacher_images": False})
    plan = plan_teachers(rows, options, TOK, placeholder_ids=[img])
    fields = teacher_fields(plan)
    assert "multi_modal_inputs" not in fields
    for row, pos in zip(plan.rows, fields["position_ids"]):
        src = raw[row.source]["prompts"]
        assert torch.equal(row.prompts[: len(src)], src.masked_fill(src == img, TOK.pad_token_id))
        assert (src == img).any() and not (row.prompts == img).any()
        assert torch.equal(pos, torch.arange(pos.shape[1]).expand(4, -1))
    with pytest.raises(ValueError, match="placeholder"):
        plan_teachers(rows, options, TOK)
    assert options_from_config({"algo": "rlsd", "teacher_images": None}).teacher.teacher_images


def test_old_schedule_names_still_work():
    assert options_from_config({"lam0": 0.2, "lam_warmup_steps": 0}).lam(40) == 0.2
    with pytest.raises(ConfigError, match="old name"):
        options_from_config({"lam0": 0.2, "lambda_init": 0.3})


def test_rows_without_a_ground_truth_keep_a():
    """No answer to hint: the row gets no teacher rows and keeps its group advantage."""
    rows, raw = make_rows()
    i = next(k for k, r in enumerate(raw) if r["uid"] == "g0" and rows.scores[k] == 1.0)
    rows.ground_truths[i] = None
    options = options_from_config({})
    plan = plan_teachers(rows, options, TOK)
    assert i not in {r.source for r in plan.rows} and not plan.scored[i]
    result = reweight(rows, plan, fake_logprobs(plan), options, lam=0.5)
    assert torch.equal(result.advantages[i], rows.advantages[i])
