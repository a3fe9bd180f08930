"""Choosing r-, building teacher contexts, and scoring all three streams on the tiny model.

Teacher log-probs are checked against an independent reference: the model's own full forward
(`model(...).logits`, positions computed by transformers itself) on the unpadded teacher sequence,
then log_softmax and a gather at the response tokens.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch

from cepo.config import TeacherConfig
from cepo.contexts import TeacherContexts, build_teacher_contexts
from cepo.data import Example, encode_prompt
from cepo.group_advantages import group_advantages
from cepo.negatives import select_wrong_answers
from cepo.reward import Rewards, compute_rewards
from cepo.rollout import RolloutConfig, Rollouts
from cepo.scoring import Scores, score_rollouts, score_student

G = 4


# --------------------------------------------------------------------------- choosing r-


def test_worst_skips_unextractable_and_breaks_ties_in_group_order():
    answers = ["5", "7", None, "8", ""]
    rewards = [1.0, 0.1, 0.0, 0.1, 0.1]
    accuracy = [1, 0, 0, 0, 0]
    # the unformatted rollout has the lowest reward but no answer; "" is not an answer either
    assert select_wrong_answers(answers, rewards, accuracy) == ["7"]
    assert select_wrong_answers(answers, rewards, accuracy, k=3) == ["7", "8"]


def test_worst_takes_the_lowest_reward():
    assert select_wrong_answers(["1", "2", "3"], [0.1, 0.05, 0.1], [0, 0, 0]) == ["2"]


def test_most_frequent():
    answers = ["7", "8", "8", " 7 ", "8", "9"]
    ones = [0.1] * 6
    assert select_wrong_answers(answers, ones, [0] * 6, choice="most_frequent") == ["8"]
    assert select_wrong_answers(answers, ones, [0] * 6, choice="most_frequent", k=3) == [
        "8",
        "7",
        "9",
    ]
    tie = select_wrong_answers(["4", "3", "3", "4"], [0.1] * 4, [0] * 4, choice="most_frequent")
    assert tie == ["4"]  # equal counts: first appearance


def test_no_candidates_and_duplicates():
    assert select_wrong_answers(["5", "5"], [1.0, 1.0], [1, 1]) == []  # all correct
    assert select_wrong_answers([None, None], [0.0, 0.0], [0, 0]) == []  # none extractable
    # equal after normalisation count once; different spellings of a value do not merge
    assert select_wrong_answers(["0.5", "0.5 ", "\\frac{1}{2}"], [0.1] * 3, [0] * 3, k=3) == [
        "0.5",
        "\\frac{1}{2}",
    ]
    with pytest.raises(ValueError, match="choice"):
        select_wrong_answers(["1"], [0.1], [0], choice="best")


def test_teacher_config_validation():
    with pytest.raises(ValueError, match="hint_template"):
        TeacherConfig(hint_template="no placeholder")
    with pytest.raises(ValueError, match="neg_fallback"):
        TeacherConfig(neg_fallback="none")
    assert TeacherConfig(hint_template="").hint_template == ""  # empty hint: alignment check


# --------------------------------------------------------------------------- helpers


class Scored(NamedTuple):
    rollouts: Rollouts
    rewards: Rewards
    advantages: torch.Tensor  # [N]
    contexts: TeacherContexts
    scores: Scores


@pytest.fixture
def batch(processor, scripted_engine, grader):
    """Scripted rollouts of G = 4 per example, with rewards and GRPO advantages."""

    def make(examples, script=None):
        prompts = [encode_prompt(processor, e) for e in examples]
        engine = scripted_engine(script) if script else scripted_engine()
        rollouts = engine.generate(prompts, RolloutConfig(group_size=G))
        rewards = compute_rewards(rollouts.texts, rollouts.ground_truths(), grader)
        return rollouts, rewards, group_advantages(rewards.reward, G)

    return make


@pytest.fixture
def score(model, processor, batch):
    """`batch` + teacher contexts + `score_rollouts` (λ = ε_w = 0.5 unless given)."""

    def run(examples, config, *, on=model, script=None, advantages=None, **kw) -> Scored:
        rollouts, rewards, adv = batch(examples, script)
        adv = adv if advantages is None else advantages
        ctx = build_teacher_contexts(rollouts, rewards, processor.tokenizer, config)
        kw = {"lam": 0.5, "eps_w": 0.5, **kw}
        return Scored(
            rollouts, rewards, adv, ctx, score_rollouts(on, rollouts, adv, ctx, config, **kw)
        )

    return run


def _reference_logprobs(model, prefix, response_ids):
    """log P(response | prefix) per token from the model's own full forward (no padding)."""
    ids = torch.cat([prefix.input_ids, response_ids])[None]
    mm = torch.cat([prefix.mm_token_type_ids, torch.zeros_like(response_ids, dtype=torch.int32)])
    kwargs = {}
    if prefix.pixel_values is not None:
        kwargs = {"pixel_values": prefix.pixel_values, "image_grid_thw": prefix.image_grid_thw}
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm[None], **kwargs
        )
    t = response_ids.numel()
    logp = torch.log_softmax(out.logits[0, -t - 1 : -1].float(), dim=-1)
    return logp.gather(-1, response_ids[:, None])[:, 0]


def _hint(processor, text):
    return torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"])


def _no_wrong_answer(p):
    """Correct or unformatted only: A != 0, but no usable r-."""
    return [f"\\boxed{{{p.example.answer}}}", "no idea", "still no idea", "none"]


# --------------------------------------------------------------------------- contexts


def test_context_token_layout(processor, batch, examples):
    rollouts, rewards, _ = batch(examples[:2])
    ctx = build_teacher_contexts(rollouts, rewards, processor.tokenizer, TeacherConfig())
    assert ctx.wrong_answers == [["999"], ["999"]]  # first wrong in group order (tie at 0.1)
    assert ctx.has_neg.all() and len(ctx.pos) == 2 * G
    prompt = rollouts.prompts[0]
    truth = prompt.example.answer
    expected_pos = torch.cat([prompt.input_ids, _hint(processor, f" {truth}")])
    assert torch.equal(ctx.pos[0].input_ids, expected_pos)
    expected_neg = torch.cat([prompt.input_ids, _hint(processor, " 999")])
    assert torch.equal(ctx.neg[0][3].input_ids, expected_neg)
    assert torch.equal(ctx.pos[0].pixel_values, prompt.pixel_values)  # images kept (default)
    assert ctx.pos[0].mm_token_type_ids.sum() == prompt.mm_token_type_ids.sum()

    config = TeacherConfig(teacher_images=False, num_neg=2)
    blind = build_teacher_contexts(rollouts, rewards, processor.tokenizer, config)
    blind_prompt = prompt.prefix(with_images=False).input_ids
    expected_blind = torch.cat([blind_prompt, _hint(processor, f" {truth}")])
    assert torch.equal(blind.pos[0].input_ids, expected_blind)
    assert blind.pos[0].pixel_values is None and blind.pos[0].mm_token_type_ids.sum() == 0
    assert blind.wrong_answers[0] == ["999", "998"]
    expected_second = torch.cat([blind_prompt, _hint(processor, " 998")])
    assert torch.equal(blind.neg[1][0].input_ids, expected_second)


def test_groups_without_a_wrong_answer(processor, batch, examples):
    rollouts, rewards, _ = batch(examples[:1], _no_wrong_answer)
    config = TeacherConfig(num_neg=2)
    ctx = build_teacher_contexts(rollouts, rewards, processor.tokenizer, config)
    assert ctx.wrong_answers == [[]] and not ctx.has_neg.any()


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("images", [True, False], ids=["with-images", "text-only"])
def test_alignment_empty_hint_gives_student_logprobs(score, examples, images):
    """docs/METHOD.md, "Guarantees" (item 10): empty hint + same inputs => teacher log-probs ==
    student log-probs."""
    batch = examples[:2] if images else [Example("What is 2+3?", "5"), Example("Is 1 < 2?", "1")]
    config = TeacherConfig(hint_template="", micro_batch_size=3)  # 3: groups split over batches
    r = score(batch, config, advantages=torch.ones(2 * G))
    s, mask = r.scores, r.rollouts.response_mask.bool()
    assert s.teacher_scored.all()
    torch.testing.assert_close(s.pos_logprobs, s.old_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.neg_logprobs, s.old_logprobs, atol=1e-5, rtol=0)
    assert s.delta[mask].abs().max() < 1e-5
    torch.testing.assert_close(s.token_advantages, mask.float(), atol=1e-5, rtol=0)


def test_scores_match_the_models_own_forward(model, score, examples):
    r = score(examples[:2], TeacherConfig(micro_batch_size=3))
    s = r.scores
    for row in (0, 1, 6):
        n = int(r.rollouts.response_mask[row].sum())
        response = r.rollouts.response_ids[row, :n]
        prompt = r.rollouts.prompts[row // G]
        for got, prefix in (
            (s.old_logprobs, prompt.prefix()),
            (s.pos_logprobs, r.contexts.pos[row]),
            (s.neg_logprobs, r.contexts.neg[0][row]),
        ):
            ref = _reference_logprobs(model, prefix, response)
            torch.testing.assert_close(got[row, :n], ref, atol=1e-5, rtol=1e-5)
        assert (s.old_logprobs[row, n:] == 0).all() and (s.token_advantages[row, n:] == 0).all()
    torch.testing.assert_close(s.delta, s.pos_logprobs - s.neg_logprobs)
    assert s.backend in ("torch", "triton")


def test_teacher_images_change_the_teacher(model, score, examples):
    seeing = score(examples[:1], TeacherConfig()).scores
    blind = score(examples[:1], TeacherConfig(teacher_images=False))
    mask = blind.rollouts.response_mask.bool()
    assert not torch.allclose(seeing.pos_logprobs[mask], blind.scores.pos_logprobs[mask])
    n = int(mask[0].sum())
    ref = _reference_logprobs(model, blind.contexts.pos[0], blind.rollouts.response_ids[0, :n])
    torch.testing.assert_close(blind.scores.pos_logprobs[0, :n], ref, atol=1e-5, rtol=1e-5)


def test_two_wrong_answers_mix_as_logmeanexp(model, score, examples):
    r = score(examples[:1], TeacherConfig(num_neg=2))
    assert r.contexts.wrong_answers == [["999", "998"]]
    n = int(r.rollouts.response_mask[0].sum())
    response = r.rollouts.response_ids[0, :n]
    lp = torch.stack([_reference_logprobs(model, r.contexts.neg[k][0], response) for k in range(2)])
    expected = torch.logsumexp(lp, 0) - torch.log(torch.tensor(2.0))
    torch.testing.assert_close(r.scores.neg_logprobs[0, :n], expected, atol=1e-5, rtol=1e-5)


def test_fallback_student_is_rlsd_and_positive_is_grpo(score, examples):
    student = score(examples[:1], TeacherConfig(), script=_no_wrong_answer)
    mask = student.rollouts.response_mask.bool()
    adv = student.advantages
    assert (adv != 0).all() and student.scores.teacher_scored.all()
    s = student.scores
    torch.testing.assert_close(s.neg_logprobs, s.old_logprobs)  # P_T- <- P_S
    positive = score(examples[:1], TeacherConfig(neg_fallback="positive"), script=_no_wrong_answer)
    assert (positive.scores.delta == 0).all()  # r- = r+
    # docs/METHOD.md, "Guarantees" (item 3) on real outputs: Δ = 0 => Â = A exactly
    assert torch.equal(positive.scores.token_advantages, adv[:, None] * mask)


def test_zero_advantage_rows_skip_the_teachers(score, examples):
    r = score(examples[:2], TeacherConfig(), advantages=torch.tensor([1.0, -1.0, 0.0, 0.5] * 2))
    s, skipped = r.scores, r.advantages == 0
    assert s.teacher_scored.tolist() == (~skipped).tolist()
    assert torch.equal(s.pos_logprobs[skipped], s.old_logprobs[skipped])
    assert (s.token_advantages[skipped] == 0).all()
    assert (s.token_advantages[~skipped].abs().sum(1) > 0).all()


def test_rlsd_uses_the_student_as_negative(score, examples):
    s = score(examples[:1], TeacherConfig(), algo="rlsd").scores
    # docs/METHOD.md, "Guarantees" (item 5)
    torch.testing.assert_close(s.neg_logprobs, s.old_logprobs)


def test_base_teacher_disables_adapters(model, score, examples):
    peft = pytest.importorskip("peft")
    base_cfg = TeacherConfig(teacher_model="base")
    with pytest.raises(ValueError, match="needs a peft model"):
        score(examples[:1], base_cfg)
    lora = peft.LoraConfig(r=2, target_modules=["v_proj"])
    wrapped = peft.get_peft_model(copy.deepcopy(model), lora)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    base = score(examples[:1], base_cfg, on=wrapped).scores
    plain = score(examples[:1], TeacherConfig()).scores
    actor = score(examples[:1], TeacherConfig(), on=wrapped).scores
    torch.testing.assert_close(base.pos_logprobs, plain.pos_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.old_logprobs, actor.old_logprobs)  # student keeps adapters
    assert not torch.allclose(actor.pos_logprobs, plain.pos_logprobs)


def test_student_only_scoring(model, score, examples):
    full = score(examples[:2], TeacherConfig())
    only = score_student(model, full.rollouts, full.advantages, micro_batch_size=5)
    mask = full.rollouts.response_mask.bool()
    torch.testing.assert_close(only.old_logprobs, full.scores.old_logprobs, atol=1e-5, rtol=0)
    assert torch.equal(only.token_advantages, full.advantages[:, None] * mask)
    assert not only.teacher_scored.any()
