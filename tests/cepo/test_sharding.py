"""cepo.sharding in one process (a world of one, gloo): what FSDP2 does to the actor's weights and
the loss inputs. The two-process runs against DDP are in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cepo import sharding
from cepo.batch import collate
from cepo.config import AdapterConfig, ModelConfig, PPOConfig
from cepo.lora import prepare_trainable
from cepo.models import load_model
from cepo.update import PolicyLoss


@pytest.fixture
def world_of_one(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _policy(tiny_dir):
    torch.manual_seed(0)
    model = load_model(tiny_dir, device="cpu", dtype=torch.float32)
    model = prepare_trainable(model, AdapterConfig(enabled=False), ModelConfig())
    return model, PolicyLoss(model, PPOConfig(), backend="torch")


def test_bf16_compute_keeps_the_loss_inputs_fp32(world_of_one, tiny_dir, encoded):
    """Weights are gathered in bf16 for the forward, but the root must not cast old log-probs
    and advantages (FSDP's default casts every floating input of a unit's forward)."""
    model, policy = _policy(tiny_dir)
    seen = {}

    def record(module, args):
        hidden, weight, labels, old_logprobs, advantages = args[:5]
        seen.update(hidden=hidden.dtype, weight=weight.dtype, old=old_logprobs.dtype,
                    adv=advantages.dtype)

    policy.loss.register_forward_pre_hook(record)
    sharding.shard(policy, model, torch.bfloat16)
    response = torch.tensor([[11, 12, 13]])
    inputs = collate([encoded[0].prefix()], 0, response, torch.ones_like(response))
    old = torch.full((1, 3), -1.2345678, dtype=torch.float32)
    out = policy(inputs, response, old, torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool))
    out.loss.backward()
    assert seen == {"hidden": torch.bfloat16, "weight": torch.bfloat16, "old": torch.float32,
                    "adv": torch.float32}
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and {g.dtype for g in grads} == {torch.float32}  # reduced into fp32 shards


def test_full_weights_gathers_for_the_phase_then_reshards(world_of_one, tiny_dir):
    model, policy = _policy(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sharding.shard(policy, model)
    assert sharding.is_sharded(policy)
    head = model.get_output_embeddings()
    assert hasattr(head.weight, "full_tensor")  # sharded (a DTensor) outside a phase
    with sharding.full_weights(policy):
        weight = head.weight
        assert not hasattr(weight, "full_tensor") and weight.shape == before["lm_head.weight"].shape
        torch.testing.assert_close(weight, before["lm_head.weight"], atol=0, rtol=0)
        first_layer = model.model.language_model.layers[0]
        with torch.no_grad():  # a block's own forward keeps it gathered within the phase
            first_layer.mlp(torch.zeros(1, 2, weight.shape[1]))
        assert not hasattr(first_layer.mlp.up_proj.weight, "full_tensor")
    assert hasattr(head.weight, "full_tensor")
    assert hasattr(first_layer.mlp.up_proj.weight, "full_tensor")

    gathered = sharding.gather_weights(model, trainable_only=False)
    assert gathered.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(gathered[key], value, atol=0, rtol=0, msg=key)
    trainable = sharding.gather_weights(model, trainable_only=True)
    assert trainable and not any("visual" in k for k in trainable)  # the frozen vision tower


def test_not_sharded_is_a_no_op(tiny_dir):
    model, policy = _policy(tiny_dir)
    assert not sharding.is_sharded(policy)
    with sharding.full_weights(policy):
        assert not hasattr(model.get_output_embeddings().weight, "full_tensor")
