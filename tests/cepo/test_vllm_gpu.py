"""The CUDA-only parts of the vLLM rollout engine: bf16 weight sync with sleep/wake, and Qwen3-VL
prompts with their images (vLLM's Qwen3-VL imports torchvision, which only a CUDA torch has).
Run on a GPU machine with vllm installed:
``python -m pytest -q -m gpu tests/cepo/test_vllm_gpu.py``."""

from __future__ import annotations

import pytest
import torch

from cepo.rollout_vllm import vllm_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not vllm_available(), reason="vllm is not installed"),
]


def _engine(model_dir, processor, model, **config):
    from cepo.rollout import RolloutConfig
    from cepo.rollout_vllm import VLLMRolloutEngine

    cfg = RolloutConfig(max_new_tokens=32, max_prompt_tokens=256, engine="vllm", **config)
    return VLLMRolloutEngine(model, processor, model_dir, cfg, seed=0)


def test_bf16_sleep_wake_and_weight_sync(text_warm_dir):
    """Asleep, the engine holds (almost) no GPU memory; awake, it samples from the policy's
    current bf16 weights (log-probs equal the trainer's within bf16 rounding)."""
    from cepo.config import AdapterConfig
    from cepo.data import encode_prompt, load_split
    from cepo.lora import apply_lora
    from cepo.models import load_model, load_processor
    from cepo.rollout import RolloutConfig
    from tests.cepo.test_vllm import policy_logprobs, train_one_step

    processor = load_processor(text_warm_dir)
    model = apply_lora(load_model(text_warm_dir, device="cuda", dtype=torch.bfloat16),
                       AdapterConfig(enabled=True))
    prompts = [encode_prompt(processor, e) for e in load_split("synthetic-text", "val", limit=4)]
    engine = _engine(text_warm_dir, processor, model, sleep=True, gpu_memory_utilization=0.2)
    try:
        free_asleep = torch.cuda.mem_get_info()[0]
        cfg = RolloutConfig(group_size=4, temperature=1.0, max_new_tokens=16)
        first = engine.generate(prompts, cfg)
        assert torch.cuda.mem_get_info()[0] >= free_asleep - 2**28  # asleep again afterwards
        train_one_step(model, first, lr=5e-2)
        rollouts = engine.generate(prompts, cfg)
        mask = rollouts.response_mask.bool()
        ours = policy_logprobs(model, rollouts, 1.0).cpu()
        torch.testing.assert_close(rollouts.sampler_logprobs[mask], ours[mask], rtol=0, atol=0.1)
    finally:
        engine.close()


def test_qwen3_vl_with_images_greedy_equals_hf(tmp_path):
    """Qwen3-VL prompts go in with their (pre-resized) images: greedy ids equal HF's, so the
    contexts scored later are the ones sampled."""
    from cepo.data import encode_prompt
    from cepo.offline.synthetic import synthetic_dataset
    from cepo.models import load_model, load_processor
    from cepo.rollout import HFRolloutEngine, RolloutConfig
    from cepo.offline.warmup import WarmupConfig, build_warm_tiny

    model_dir = str(build_warm_tiny(tmp_path / "warm", WarmupConfig(steps=150)))
    processor = load_processor(model_dir)
    model = load_model(model_dir, device="cuda", dtype=torch.float32)
    prompts = [encode_prompt(processor, e) for e in synthetic_dataset("val", size=4)]
    engine = _engine(model_dir, processor, model, sleep=False)
    try:
        cfg = RolloutConfig(group_size=1, temperature=0.0, max_new_tokens=24)
        ours = engine.generate(prompts, cfg)
        hf = HFRolloutEngine(model, processor).generate(prompts, cfg)
        assert torch.equal(ours.response_ids, hf.response_ids.cpu())
        assert not set(ours.response_ids.flatten().tolist()) & set(engine.suppressed_ids)
    finally:
        engine.close()
