"""End to end: one experience step (sample -> reward -> advantages -> teachers -> Â) on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from cepo.config import TeacherConfig
from cepo.experience import ExperienceConfig, make_experience
from cepo.rollout import RolloutConfig

LAM, EPS_W = 0.5, 0.5


def _config(**kw) -> ExperienceConfig:
    kw.setdefault("teacher", TeacherConfig(micro_batch_size=6))
    rollout = RolloutConfig(group_size=4, max_new_tokens=12)
    return ExperienceConfig(eps_w=EPS_W, rollout=rollout, **kw)


def test_one_step_with_real_generation(model, processor, examples, grader):
    experience = make_experience(model, processor, examples[:4], lam=LAM, config=_config(),
                                 grader=grader)
    r = experience.rollouts
    n, t = r.response_ids.shape
    assert n == 16 and t <= 12
    for name in ("old_logprobs", "token_advantages"):
        assert getattr(experience, name).shape == (n, t)
    for name in ("pos_logprobs", "neg_logprobs", "delta", "token_weight"):
        assert getattr(experience.scores, name).shape == (n, t)
    mask = experience.response_mask.bool()
    assert (experience.old_logprobs[mask] < 0).all()
    assert (experience.old_logprobs[~mask] == 0).all()
    assert (experience.token_advantages[~mask] == 0).all()
    assert experience.advantages.shape == (n,) and experience.rewards.reward.shape == (n,)
    # random weights almost never box an answer, so groups are mostly uniform: A = Â = 0 there,
    # and the teachers ran exactly on the rows with A != 0
    zero = experience.advantages == 0
    assert (experience.token_advantages[zero] == 0).all()
    assert torch.equal(experience.scores.teacher_scored, ~zero)
    # the step's metrics are the statistics of what the step produced
    m, rw = experience.metrics, experience.rewards
    lengths = experience.rollouts.response_mask.sum(1).double()
    groups = rw.reward.view(-1, 4)
    mixed = ((groups != groups[:, :1]).any(1)).double().mean()
    for key, want in (("reward/mean", rw.reward.double().mean()),
                      ("reward/accuracy", rw.accuracy.double().mean()),
                      ("reward/format", rw.format.double().mean()),
                      ("rollout/response_length", lengths.mean()),
                      ("rollout/mixed_groups", mixed),
                      ("cepo/lambda", LAM)):
        assert m[key] == pytest.approx(float(want), rel=1e-6), key
    assert m["time/rollout"] > 0 and m["time/score"] >= 0


def test_mixed_groups_give_spec_conforming_token_advantages(
    model, processor, examples, grader, scripted_engine
):
    experience = make_experience(
        model,
        processor,
        examples[:3],
        lam=LAM,
        config=_config(),
        engine=scripted_engine(),
        grader=grader,
    )
    a, s = experience.advantages, experience.scores
    mask = experience.response_mask.bool()
    torch.testing.assert_close(experience.rewards.reward, torch.tensor([1.0, 0.1, 0.1, 0.0] * 3))
    assert experience.wrong_answers == [["999"]] * 3
    assert s.teacher_scored.all() and experience.metrics["rollout/mixed_groups"] == 1.0

    a_tok = a[:, None].expand_as(mask)[mask]  # [valid tokens]
    a_hat = s.token_advantages[mask]
    assert (a_hat != 0).all()  # mixed groups: non-zero Â on every response token
    # §8.1 sign(Â) = sign(A)
    assert torch.equal(torch.sign(a_hat), torch.sign(a_tok))
    # §8.2 |A|(1 - λ ε_w) <= |Â| <= |A|(1 + λ ε_w)
    tol = 1e-6
    assert (a_hat.abs() >= a_tok.abs() * (1 - LAM * EPS_W) - tol).all()
    assert (a_hat.abs() <= a_tok.abs() * (1 + LAM * EPS_W) + tol).all()
    # Â is the docs/METHOD.md, "Advantages" formula of the returned Δ (independent recomputation)
    delta = s.delta[mask]
    w = torch.exp(torch.sign(a_tok) * delta.double()).clamp(1 - EPS_W, 1 + EPS_W)
    torch.testing.assert_close(a_hat.double(), a_tok.double() * ((1 - LAM) + LAM * w))
    # §8.3 Δ = 0 => Â = A: the teachers are real models here, so force it with r- = r+ ...
    same = make_experience(
        model,
        processor,
        examples[:3],
        lam=LAM,
        engine=scripted_engine(),
        grader=grader,
        config=_config(teacher=TeacherConfig(hint_template="")),
    )
    assert same.scores.delta[mask].abs().max() < 1e-5
    torch.testing.assert_close(same.token_advantages[mask], a_tok, atol=1e-5, rtol=0)
    # ... and the reweighting really does something when the hints differ
    assert not torch.allclose(a_hat, a_tok)
    for key in (
        "cepo/delta_mean",
        "cepo/delta_mean_pos",
        "cepo/delta_mean_neg",
        "cepo/frac_wrong_dir_pos",
        "cepo/adv_pre",
        "cepo/adv_post",
    ):
        assert math.isfinite(experience.metrics[key])


@pytest.mark.parametrize("lam, algo", [(0.0, "cepo"), (LAM, "grpo")])
def test_grpo_path_skips_teachers(model, processor, examples, grader, scripted_engine, lam, algo):
    kw = dict(engine=scripted_engine(), grader=grader)
    grpo = make_experience(model, processor, examples[:2], lam=lam, config=_config(algo=algo), **kw)
    cepo = make_experience(model, processor, examples[:2], lam=LAM, config=_config(), **kw)
    mask = grpo.response_mask.bool()
    assert torch.equal(grpo.token_advantages, grpo.advantages[:, None] * mask)  # §8.4
    assert not grpo.scores.teacher_scored.any() and grpo.wrong_answers == [[], []]
    torch.testing.assert_close(grpo.old_logprobs, cepo.old_logprobs, atol=1e-5, rtol=0)


def test_rlsd_step(model, processor, examples, grader, scripted_engine):
    experience = make_experience(
        model,
        processor,
        examples[:2],
        lam=LAM,
        config=_config(algo="rlsd"),
        engine=scripted_engine(),
        grader=grader,
    )
    # §8.5: P_T- = P_S
    torch.testing.assert_close(experience.scores.neg_logprobs, experience.old_logprobs)


def test_bad_inputs_are_explained(model, processor, examples, grader):
    with pytest.raises(ValueError, match="lam"):
        make_experience(model, processor, examples[:1], lam=1.5, grader=grader)
    tight = ExperienceConfig(rollout=RolloutConfig(max_prompt_tokens=5))
    with pytest.raises(ValueError, match="longer than max_prompt_tokens=5"):
        make_experience(model, processor, examples[:2], lam=LAM, config=tight, grader=grader)
    with pytest.raises(ValueError, match="algo"):
        ExperienceConfig(algo="ppo")


def test_grading_budget_of_a_step_is_counted(model, processor, examples, grader, scripted_engine):
    experience = make_experience(model, processor, examples[:3], lam=0.0, engine=scripted_engine(),
                          grader=grader, config=_config(grader_batch_budget_s=1e-9))
    # per group: the correct answer is an exact match; 999 and 998 need math-verify: skipped
    assert experience.metrics["reward/grader_skipped"] == 6.0
    torch.testing.assert_close(experience.rewards.reward, torch.tensor([1.0, 0.1, 0.1, 0.0] * 3))
