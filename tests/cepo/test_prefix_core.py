"""Prefix sharing through the scoring core and the PPO update: the same log-probs, Δ, w, Â and
the same optimizer step as the unshared path, with each prompt encoded once (not once per row).

The unshared path (``prefix_sharing="false"``) is the independent reference: whole
``[prompt | hint | response]`` rows, left-padded, through the model's ordinary forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

import cepo.prefix as prefix_module
from cepo.config import AdapterConfig, PPOConfig, TeacherConfig
from cepo.contexts import build_teacher_contexts
from cepo.experience import ExperienceConfig, make_experience
from cepo.lora import apply_lora
from cepo.rollout import RolloutConfig
from cepo.scoring import score_rollouts, score_student
from cepo.update import PolicyLoss, ppo_update

G = 4
FIELDS = ("old_logprobs", "pos_logprobs", "neg_logprobs", "delta", "token_weight",
          "token_advantages")


@pytest.fixture(scope="module")
def experience(model, processor, examples, grader):
    from tests.cepo.conftest import ScriptedRolloutEngine, mixed_script

    config = ExperienceConfig(rollout=RolloutConfig(group_size=G, max_new_tokens=12),
                              prefix_sharing="false")
    return make_experience(model, processor, examples[:3], lam=0.5, config=config,
                           engine=ScriptedRolloutEngine(processor, mixed_script), grader=grader)


def _trainable(model, mode: str):
    model = copy.deepcopy(model)
    if mode == "full":
        return model.requires_grad_(True).train()
    model = apply_lora(model, AdapterConfig(rank=4, alpha=8.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at 0: make the adapters change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


@pytest.fixture(scope="module")
def models(model):
    return {mode: _trainable(model, mode) for mode in ("full", "lora")}


@pytest.fixture
def encodes(monkeypatch):
    """Counts the prompt encodings (`cepo.prefix.encode_prefix` calls)."""
    calls = []
    real = prefix_module.encode_prefix

    def counted(model, prefix):
        calls.append(prefix)
        return real(model, prefix)

    monkeypatch.setattr(prefix_module, "encode_prefix", counted)
    return calls


TEACHERS = {
    "images": TeacherConfig(micro_batch_size=3),  # micro-batches of 3 cut the groups of 4
    "blind-k2": TeacherConfig(teacher_images=False, num_neg=2, micro_batch_size=5),
    "base": TeacherConfig(teacher_model="base", micro_batch_size=3),
}


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("teachers", list(TEACHERS))
def test_scoring_core_with_and_without_sharing(models, processor, experience, encodes, mode,
                                               teachers):
    if teachers == "base" and mode == "full":
        pytest.skip("teacher_model='base' needs adapters")
    model, config = models[mode], TEACHERS[teachers]
    rollouts, adv = experience.rollouts, experience.advantages
    assert adv.abs().sum() > 0
    contexts = build_teacher_contexts(rollouts, experience.rewards, processor.tokenizer, config)
    kw = {"lam": 0.5, "eps_w": 0.5}
    off = score_rollouts(model, rollouts, adv, contexts, config, prefix_sharing="false", **kw)
    assert not encodes
    on = score_rollouts(model, rollouts, adv, contexts, config, prefix_sharing="true", **kw)
    prompts = len(rollouts.prompts)
    scored_groups = len(set((torch.nonzero(adv).flatten() // G).tolist()))
    # one encoding per prompt for the student; teachers reuse it when they see the same prompt
    # under the same weights, else one more per prompt whose rows are teacher-scored
    extra = 0 if teachers == "images" else scored_groups
    assert len(encodes) == prompts + extra
    assert torch.equal(on.teacher_scored, off.teacher_scored)
    assert (off.delta.abs() > 1e-3).any()  # the teachers do disagree with each other
    for field in FIELDS:
        torch.testing.assert_close(getattr(on, field), getattr(off, field), atol=3e-5, rtol=1e-4,
                                   msg=lambda m, f=field: f"{f}: {m}")


def test_student_scoring_with_and_without_sharing(models, experience, encodes):
    model, rollouts = models["lora"], experience.rollouts
    off = score_student(model, rollouts, experience.advantages, micro_batch_size=5,
                        prefix_sharing="false")
    on = score_student(model, rollouts, experience.advantages, micro_batch_size=5,
                       prefix_sharing="auto")
    assert len(encodes) == len(rollouts.prompts)
    torch.testing.assert_close(on.old_logprobs, off.old_logprobs, atol=3e-5, rtol=1e-4)
    assert torch.equal(on.token_advantages, off.token_advantages)


def _update(model, experience, share: str, **ppo):
    from accelerate import Accelerator

    actor = copy.deepcopy(model).train()
    before = [p.detach().clone() for p in actor.parameters()]
    policy = PolicyLoss(actor, PPOConfig(**ppo), prefix_sharing=share)
    optimizer = torch.optim.SGD(actor.parameters(), lr=1.0)  # the step is minus the gradient
    metrics = ppo_update(policy, optimizer, experience, PPOConfig(**ppo), grad_clip=0.0,
                         accelerator=Accelerator(cpu=True),
                         generator=torch.Generator().manual_seed(0))
    return [p.detach() - b for p, b in zip(actor.parameters(), before)], metrics


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_update_with_and_without_sharing(models, experience, encodes, mode):
    # 12 rollouts, 2 shuffled mini-batches of 6, micro-batches of 4: sorted by prompt, a
    # micro-batch holds rows of 1-2 groups, each group's prompt encoded once per micro-batch
    ppo = {"mini_batches": 2, "micro_batch_size": 4, "shuffle": True}
    off, m_off = _update(models[mode], experience, "false", **ppo)
    assert not encodes
    on, m_on = _update(models[mode], experience, "true", **ppo)
    assert 0 < len(encodes) < experience.rollouts.num_rollouts
    assert max(d.abs().max() for d in off) > 0
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    for key in ("ppo/loss", "ppo/clip_frac", "ppo/approx_kl", "tokens/update"):
        assert m_on[key] == pytest.approx(m_off[key], rel=1e-4, abs=1e-7), key
    assert m_on["ppo/grad_norm"] == pytest.approx(m_off["ppo/grad_norm"], rel=1e-4)
