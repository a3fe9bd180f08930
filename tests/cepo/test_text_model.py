"""Text-only models on the trainer's path: the tiny Qwen3 (`tiny-text`), prompts without vision
tokens, a 2-step `python -m cepo.train` with its resume and with GRPO; and what the vLLM engine
needs that runs without vLLM (engine choice, the folded LoRA weights it is sent)."""

from __future__ import annotations

import pytest
import torch

import cepo.train as train_module
from cepo import checkpoint as ckpt
from cepo.data import encode_prompt, load_split
from cepo.errors import NotAvailable
from cepo.metrics import read
from cepo.models import forward_hidden, load_model, load_processor
from cepo.rollout import HFRolloutEngine, RolloutConfig
from cepo.rollout_vllm import policy_weights, resolve_engine, vllm_available
from cepo.textmodel import TextProcessor, is_text_model


def text_args(model_dir, out, algo="cepo", steps=2, **extra) -> list[str]:
    args = {
        "model.name": model_dir, "data.train": "synthetic-text", "algo": algo, "steps": steps,
        "output_dir": out, "prompts_per_step": 4, "rollout.group_size": 4,
        "rollout.max_new_tokens": 24, "data.train_limit": 32, "data.val_limit": 8,
        "val.every": 2, "checkpoint.every": 1, "teacher.micro_batch_size": 16,
        "ppo.micro_batch_size": 8, "optim.lr": 2e-3, "optim.warmup_steps": 1,
        "log.progress": False, "num_threads": 1, **extra,
    }
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_text_prompts_have_no_vision_tokens(text_warm_dir):
    processor = load_processor(text_warm_dir)
    assert isinstance(processor, TextProcessor) and processor.tokenizer.padding_side == "left"
    example = load_split("synthetic-text", "val", limit=1)[0]
    assert not example.images and "<image>" not in example.problem
    prompt = encode_prompt(processor, example)
    text = processor.tokenizer.decode(prompt.input_ids)
    assert text.startswith("<|im_start|>user\nWhat is ")
    assert text.endswith("<|im_start|>assistant\n")
    assert "vision" not in text and "image" not in text
    assert not prompt.mm_token_type_ids.any() and prompt.pixel_values is None
    assert torch.equal(prompt.blind_ids, prompt.input_ids)
    with pytest.raises(ValueError, match="text-only model takes no images"):
        encode_prompt(processor, load_split("synthetic", "val", limit=1)[0])


def test_text_model_forward_matches_its_own_logits(text_warm_dir):
    """The scoring entry point (hidden states before the lm_head, our positions) reproduces the
    model's own left-padded forward."""
    model = load_model(text_warm_dir, device="cpu", dtype=torch.float32)
    processor = load_processor(text_warm_dir)
    assert is_text_model(model) and type(model).__name__ == "Qwen3ForCausalLM"
    from cepo.batch import collate

    prompts = [encode_prompt(processor, e) for e in load_split("synthetic-text", "val", limit=3)]
    inputs = collate([p.prefix() for p in prompts], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = forward_hidden(model, inputs)
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
    ours = hidden @ model.lm_head.weight.T
    real = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[real], logits[real], rtol=1e-5, atol=1e-5)


def test_warmed_text_model_answers_chain_sums(text_warm_dir):
    model = load_model(text_warm_dir, device="cpu")
    processor = load_processor(text_warm_dir)
    prompts = [encode_prompt(processor, e) for e in load_split("synthetic-text", "val", limit=4)]
    r = HFRolloutEngine(model, processor).generate(
        prompts, RolloutConfig(group_size=1, temperature=0.0, max_new_tokens=24))
    assert sum("\\boxed{" in t for t in r.texts) >= 3, r.texts


@pytest.mark.parametrize("algo", ["cepo", "grpo"])
def test_text_run_and_resume(text_warm_dir, tmp_path, algo):
    out = tmp_path / "run"
    extra = {"lora.enabled": False} if algo == "grpo" else {}  # full fine-tuning too
    summary = train_module.main(text_args(text_warm_dir, str(out), algo, **extra))
    assert summary["steps"] == 2
    train_module.main(text_args(text_warm_dir, str(out), algo, steps=3, resume=True, **extra))
    records = read(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(r["rollout/mixed_groups"] > 0 for r in records[1:])
    assert ckpt.latest_checkpoint(out).name == "step-000003"
    if algo == "cepo":
        assert any("cepo/delta_mean" in r for r in records[1:])  # the teachers scored


def test_engine_choice():
    assert resolve_engine("hf", "cpu") == "hf"
    assert resolve_engine("auto", "cpu") == "hf"  # vLLM only pays off on a GPU
    if not vllm_available():
        with pytest.raises(NotAvailable, match="vllm is not installed"):
            resolve_engine("vllm", "cpu")
        with pytest.raises(SystemExit, match="not available: rollout.engine=vllm but vllm is"):
            train_module.main(["--rollout.engine", "vllm", "--output_dir", "/nonexistent/x"])
    with pytest.raises(ValueError, match="rollout.engine"):
        resolve_engine("fast", "cpu")
    with pytest.raises(ValueError, match="engine must be"):
        RolloutConfig(engine="fast")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        RolloutConfig(gpu_memory_utilization=1.5)


def test_policy_weights_fold_lora_without_touching_the_base(text_warm_dir):
    """What the vLLM engine is sent equals peft's own merge, under the base model's names, and
    the trainer's base weights stay as they were."""
    from cepo.config import AdapterConfig
    from cepo.lora import apply_lora

    base = load_model(text_warm_dir, device="cpu", dtype=torch.float32)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_lora(base, AdapterConfig(enabled=True))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # a trained adapter (B starts at 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sent = dict(policy_weights(model))
    assert sent.keys() == original.keys()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # nothing modified in place
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    merged = model.merge_and_unload()
    for n, p in merged.named_parameters():
        torch.testing.assert_close(sent[n], p, rtol=0, atol=1e-6)
    changed = {n for n in original if not torch.equal(sent[n], original[n])}
    assert len(changed) == len(adapted) == 14  # 7 linear layers per block, 2 blocks
