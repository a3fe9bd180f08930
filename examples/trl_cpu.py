"""CEPO as a drop-in for TRL's GRPOTrainer on a CPU machine: a tiny text model or a tiny Qwen3-VL.

    python examples/trl_cpu.py --model text     # a tiny Qwen3 causal LM, a text dataset
    python examples/trl_cpu.py --model vl       # a tiny Qwen3-VL, images in the prompts

Offline and in a few seconds: the tiny random models are written to a temporary folder (removed
at the end), the trainer runs 2 optimizer steps. Nothing here is CPU-specific: `CEPOConfig` trains
in fp32 when there is no bf16 GPU (GRPOConfig's bf16 default would fail there unless
`use_cpu=True, bf16=False`), and without torchvision the trainer loads cepo's image-only Qwen3-VL
processor itself. A random model rarely writes a ``\\boxed{}`` answer, so the trainer warns that
the wrong-answer teacher falls back to the student: with a real model the same code runs CEPO.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from cepo.data import FORMAT_SUFFIX
from cepo.grading import extract_boxed
from cepo.integrations.trl import CEPOConfig, CEPOGRPOTrainer
from cepo.offline.synthetic import synthetic_dataset
from cepo.offline.tiny import build_tiny_model


def build_tiny_text_model(directory: Path, tokenizer_dir: str | Path) -> Path:
    """A tiny random Qwen3 causal LM with the tokenizer (and chat template) of `tokenizer_dir`."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.padding_side = "left"
    config = Qwen3Config(
        vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    # a text model: AutoProcessor must give the tokenizer, not the VL processor it came from
    config_file = Path(directory) / "tokenizer_config.json"
    data = json.loads(config_file.read_text())
    data.pop("processor_class", None)
    config_file.write_text(json.dumps(data))
    return Path(directory)


def text_dataset(n: int = 8) -> Dataset:
    """Conversational prompts plus the ground-truth column CEPO grades against (``answer``)."""
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"What is {i} + {i}?{FORMAT_SUFFIX}"}],
         "answer": str(2 * i)} for i in range(1, n + 1)])


def vl_dataset(n: int = 4) -> Dataset:
    """Image prompts from cepo's synthetic visual-math set: an ``images`` column, one image
    placeholder in the prompt, and ``answer``."""
    rows = []
    for example in synthetic_dataset("train", size=n, seed=0):
        text = example.problem.replace("<image>", "").strip() + FORMAT_SUFFIX
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"},
                                                             {"type": "text", "text": text}]}],
                     "images": list(example.images), "answer": example.answer})
    return Dataset.from_list(rows)


def reward(completions, answer, **kwargs) -> list[float]:
    """1 for the right boxed answer, 0.1 for a boxed one; shorter is slightly better, so a group
    of random completions still has a spread of rewards (GRPO advantages ≠ 0)."""
    out = []
    for completion, truth in zip(completions, answer):
        text = completion[0]["content"]
        boxed = extract_boxed(text)
        out.append((1.0 if boxed == truth else 0.1 if boxed is not None else 0.0)
                   - len(text) / 1000)
    return out


def main(argv: list[str] | None = None) -> CEPOGRPOTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("text", "vl"), default="text")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cepo-trl-") as tmp:
        vl_dir = build_tiny_model(Path(tmp) / "vl")
        if args.model == "text":
            model, dataset = str(build_tiny_text_model(Path(tmp) / "text", vl_dir)), text_dataset()
        else:
            model, dataset = str(vl_dir), vl_dataset()
        config = CEPOConfig(
            output_dir=str(Path(tmp) / "out"), max_steps=args.steps, report_to="none",
            per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
            learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0,
            remove_unused_columns=False,  # keep the answer column
            cepo_lambda_warmup_steps=2,  # λ: 0.5 at the first generation batch, 0.25 at the second
            cepo_min_pixels=128 * 128, cepo_max_pixels=128 * 128)  # tiny images for the tiny VL
        trainer = CEPOGRPOTrainer(model, reward_funcs=reward, args=config, train_dataset=dataset)
        trainer.train()
    for record in trainer.state.log_history:
        if "loss" in record:
            print(f"step {record['step']}: loss={record['loss']:+.5f} "
                  f"reward={record['reward']:.3f} λ={record.get('cepo/lambda', float('nan')):.2f}")
    return trainer


if __name__ == "__main__":
    main()
