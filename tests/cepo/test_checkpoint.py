"""Checkpoints: atomic commit, the `latest` pointer, keep-last-K, RNG and weights round trips."""

from __future__ import annotations

import copy
import hashlib
import random

import numpy as np
import pytest
import torch

from cepo import checkpoint as ckpt


def _save(run_dir, step, keep_last=2, payload="w"):
    tmp = ckpt.begin(run_dir, step)
    (tmp / "weights.txt").write_text(f"{payload}{step}")
    ckpt.save_rng(tmp, 0)
    return ckpt.commit(run_dir, step, {"lr": 0.1}, keep_last)


def test_commit_keeps_last_k_and_points_latest(tmp_path):
    for step in (2, 4, 6):
        final = _save(tmp_path, step)
    assert final.name == "step-000006"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    assert ckpt.latest_checkpoint(tmp_path) == final
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000006"
    state = ckpt.read_state(final)
    assert {k: state[k] for k in ("step", "lr")} == {"step": 6, "lr": 0.1}
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*")
                   if p.is_file() and p.name != "trainer_state.json")
    assert sorted(state["files"]) == files == ["rng/rank-0.pt", "weights.txt"]
    for name, entry in state["files"].items():  # checked against hashlib, not the module
        data = (final / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # nothing left behind


def test_a_crash_while_saving_never_breaks_latest(tmp_path):
    good = _save(tmp_path, 2)
    # crash 1: the staging directory is half written, never committed
    tmp = ckpt.begin(tmp_path, 4)
    (tmp / "weights.txt").write_text("half")
    assert ckpt.latest_checkpoint(tmp_path) == good
    # crash 2: renamed into place but trainer_state.json missing (not complete) -> ignored
    (tmp_path / "checkpoints" / "step-000008").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == good
    # a stale pointer (its checkpoint deleted by hand) falls back to the newest complete one
    (tmp_path / "checkpoints" / "latest").write_text("step-000099")
    assert ckpt.latest_checkpoint(tmp_path) == good
    # the next save cleans the leftover staging directory and succeeds
    assert _save(tmp_path, 4).name == "step-000004"
    assert (tmp_path / "checkpoints" / "step-000004" / "weights.txt").read_text() == "w4"


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 2, payload="a")
    final = _save(tmp_path, 2, payload="b")
    assert (final / "weights.txt").read_text() == "b2"
    assert len(ckpt.list_checkpoints(tmp_path)) == 1


def test_resolve_checkpoint_path(tmp_path):
    final = _save(tmp_path, 3)
    for given in (tmp_path, tmp_path / "checkpoints", final):
        assert ckpt.resolve_checkpoint_path(given) == final
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_checkpoint_path(tmp_path / "nothing")


def test_rng_round_trip(tmp_path):
    final = _save(tmp_path, 1)  # saved the state at this point
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    assert ckpt.load_rng(final, 0)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])
    assert not ckpt.load_rng(final, 1)  # no state for a rank that did not exist


def test_weights_round_trip_full_and_lora(tmp_path, model):
    import copy

    peft = pytest.importorskip("peft")
    full = copy.deepcopy(model)
    torch.nn.init.normal_(full.lm_head.weight)
    ckpt.save_model(full, tmp_path / "full")
    fresh = copy.deepcopy(model)
    ckpt.load_weights(fresh, tmp_path / "full")
    for (name, a), b in zip(full.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name

    config = peft.LoraConfig(r=2, target_modules=["v_proj"])
    lora = peft.get_peft_model(copy.deepcopy(model), config)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    ckpt.save_model(lora, tmp_path / "lora")
    other = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    ckpt.load_weights(other, tmp_path / "lora")
    for (name, a), b in zip(lora.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_optimizer_state_by_name_round_trip():
    """Saved by parameter name (the FSDP layout), loaded by index: AdamW continues exactly."""
    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        opt = torch.optim.AdamW([{"params": [net[0].weight, net[2].weight]},
                                 {"params": [net[0].bias, net[2].bias], "weight_decay": 0.0}])
        return net, opt

    def step(net, opt, seed):
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()

    net, opt = build()
    step(net, opt, 1)
    names = ckpt.optimizer_param_names(net, opt)
    assert names == ["0.weight", "2.weight", "0.bias", "2.bias"]
    # deep copy: as if read back from disk (a state dict shares its tensors with the optimizer)
    named = copy.deepcopy(ckpt.named_optimizer_state(opt.state_dict(), names))
    assert set(named["state"]) == set(names) and named["param_groups"][1]["params"][0] == "0.bias"

    resumed, resumed_opt = build()
    resumed.load_state_dict(net.state_dict())
    resumed_opt.load_state_dict(ckpt.indexed_optimizer_state(named, names))
    step(net, opt, 2)
    step(resumed, resumed_opt, 2)
    for a, b in zip(net.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

    with pytest.raises(RuntimeError, match="does not train"):
        ckpt.indexed_optimizer_state(named, names[:2])
