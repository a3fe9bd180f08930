"""The PPO update: an exact mini-batch loss however the rollouts are split into micro-batches."""

from __future__ import annotations

import copy

import pytest
import torch

from cepo.config import PPOConfig, TeacherConfig
from cepo.experience import ExperienceConfig, make_experience
from cepo.rollout import RolloutConfig
from cepo.update import (
    NonFiniteError,
    NonFiniteGuard,
    PolicyLoss,
    check_replicas,
    ppo_update,
)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def experience(model, processor, examples, grader):
    from tests.cepo.conftest import ScriptedRolloutEngine, mixed_script

    config = ExperienceConfig(rollout=RolloutConfig(group_size=4, max_new_tokens=12),
                              teacher=TeacherConfig(micro_batch_size=8))
    return make_experience(model, processor, examples[:3], lam=0.5, config=config,
                           engine=ScriptedRolloutEngine(processor, mixed_script), grader=grader)


def _update(model, experience, accelerator, **ppo):
    actor = copy.deepcopy(model).train()
    before = [p.detach().clone() for p in actor.parameters()]
    policy = PolicyLoss(actor, PPOConfig(**ppo))
    optimizer = torch.optim.SGD(actor.parameters(), lr=1.0)  # the step is minus the gradient
    metrics = ppo_update(policy, optimizer, experience, PPOConfig(**ppo), grad_clip=0.0,
                         accelerator=accelerator)
    return [p.detach() - b for p, b in zip(actor.parameters(), before)], metrics


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean",
                                         "seq-mean-token-sum-norm"])
def test_micro_batches_do_not_change_the_step(model, experience, accelerator, aggregation):
    # 12 rollouts of different lengths: one forward of all of them vs micro-batches of 5 (5+5+2,
    # each trimmed to its own longest response). docs/METHOD.md, "Loss": the loss is a mean over the
    # whole mini-batch, so the update must not depend on the split.
    assert experience.token_advantages.abs().sum() > 0
    whole, m1 = _update(model, experience, accelerator, aggregation=aggregation,
                        mini_batches=1, micro_batch_size=12)
    split, m2 = _update(model, experience, accelerator, aggregation=aggregation,
                        mini_batches=1, micro_batch_size=5)
    assert max(d.abs().max() for d in whole) > 0
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    assert m1["ppo/loss"] == pytest.approx(m2["ppo/loss"], rel=1e-5, abs=1e-7)
    assert m1["ppo/optimizer_steps"] == 1.0


def test_mini_batches_are_optimizer_steps(model, experience, accelerator):
    _, metrics = _update(model, experience, accelerator, mini_batches=2, micro_batch_size=4)
    assert metrics["ppo/optimizer_steps"] == 2.0
    assert metrics["tokens/update"] == float(experience.response_mask.sum())
    for key in ("ppo/clip_frac", "ppo/dual_clip_frac", "ppo/approx_kl", "ppo/ratio_max",
                "ppo/grad_norm", "time/update"):
        assert key in metrics
    # the second mini-batch is scored by the updated policy: its ratios leave 1
    assert metrics["ppo/ratio_max"] >= 1.0 and metrics["ppo/ratio_min"] <= 1.0


class _Replicas:
    """Stands in for an accelerator of `n` processes whose other replicas hold `others`'
    (sum, sum of squares) of the trainable weights."""

    device = torch.device("cpu")

    def __init__(self, others):
        self.others, self.num_processes = others, 1 + len(others)

    def gather(self, local):
        assert self.num_processes > 1, "one process has nothing to gather"
        rows = [local] + [torch.tensor([o], dtype=local.dtype) for o in self.others]
        return torch.cat(rows)


def test_replica_check_compares_the_trainable_weights_of_every_process():
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen weights are not compared
    w = model.weight.detach().double()
    same = (w.sum().item(), w.square().sum().item())
    check_replicas(model, _Replicas([same, same]))  # equal replicas pass
    with pytest.raises(RuntimeError, match="differ between processes"):
        check_replicas(model, _Replicas([same, (same[0] + 1e-6, same[1])]))
    # one process: nothing to compare, nothing gathered
    check_replicas(model, _Replicas([]))


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(model, experience, accelerator):
    """A NaN advantage makes the loss NaN: the optimizer step is skipped (the weights stay
    exactly as they were, even with weight decay and momentum), counted, and the third in a
    row raises NonFiniteError."""
    bad = copy.copy(experience)
    bad.scores = copy.copy(experience.scores)
    bad.scores.token_advantages = experience.token_advantages.clone()
    bad.scores.token_advantages[0, 0] = float("nan")  # in the only mini-batch
    actor = copy.deepcopy(model).train()
    before = [p.detach().clone() for p in actor.parameters()]
    policy = PolicyLoss(actor, PPOConfig())
    optimizer = torch.optim.AdamW(actor.parameters(), lr=1e-2, weight_decay=0.1)
    guard = NonFiniteGuard(limit=3)
    ppo = PPOConfig(mini_batches=1)
    for in_a_row in (1, 2):
        metrics = ppo_update(policy, optimizer, bad, ppo, grad_clip=1.0,
                             accelerator=accelerator, guard=guard)
        assert metrics["update/skipped_nonfinite"] == 1.0 and guard.in_a_row == in_a_row
        assert metrics["ppo/optimizer_steps"] == 0.0
        assert all(p.grad is None for p in actor.parameters())
    for p, b in zip(actor.parameters(), before):
        assert torch.equal(p, b)
    assert not optimizer.state  # AdamW never stepped
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row.*--optim.lr"):
        ppo_update(policy, optimizer, bad, ppo, grad_clip=1.0, accelerator=accelerator,
                   guard=guard)
    metrics = ppo_update(policy, optimizer, experience, ppo, grad_clip=1.0,
                         accelerator=accelerator, guard=NonFiniteGuard(limit=3, in_a_row=2))
    assert metrics["update/skipped_nonfinite"] == 0.0 and metrics["ppo/optimizer_steps"] == 1.0
