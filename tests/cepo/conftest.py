"""Shared fixtures for the experience-pipeline tests: the mini tiny Qwen3-VL, built once per
session into a temporary directory and loaded through the same path as a real checkpoint, the
synthetic data, one grader, and a scripted rollout engine for groups with known rewards."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from cepo.batch import collate
from cepo.data import EncodedPrompt, encode_prompt
from cepo.grading import Grader
from cepo.models import load_model, load_processor
from cepo.offline.synthetic import VISUAL_KINDS, synthetic_dataset
from cepo.offline.tiny import build_tiny_model
from cepo.offline.warmup import WarmupConfig, build_warm_tiny
from cepo.rollout import RolloutConfig, Rollouts


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "mini", vocab="mini"))


@pytest.fixture(scope="session")
def processor(tiny_dir):
    return load_processor(tiny_dir)


@pytest.fixture(scope="session")
def model(tiny_dir):
    return load_model(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def examples():
    # every kind, so prompts differ in length (left padding gets exercised)
    return synthetic_dataset("train", size=8, seed=0, kinds=(*VISUAL_KINDS, "chain_sum"))


@pytest.fixture(scope="session")
def grader():
    g = Grader(timeout_s=5.0)
    yield g
    g.close()


class ScriptedRolloutEngine:
    """A `RolloutEngine` that "samples" given texts, so tests control correctness per rollout.

    `script(prompt) -> G texts` is called per prompt; each text is tokenised and closed with EOS.
    """

    def __init__(self, processor, script: Callable[[EncodedPrompt], Sequence[str]]):
        self.tokenizer = processor.tokenizer
        self.script = script

    def generate(self, prompts: Sequence[EncodedPrompt], config: RolloutConfig) -> Rollouts:
        tok = self.tokenizer
        texts, ids = [], []
        for prompt in prompts:
            group = list(self.script(prompt))
            assert len(group) == config.group_size
            for text in group:
                texts.append(text)
                ids.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        width = max(len(x) for x in ids)
        response_ids = torch.full((len(ids), width), tok.pad_token_id)
        response_mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, x in enumerate(ids):
            response_ids[row, : len(x)] = torch.tensor(x)
            response_mask[row, : len(x)] = 1
        rows = [p.prefix() for p in prompts for _ in range(config.group_size)]
        prompt_batch = collate(rows, tok.pad_token_id)
        return Rollouts(
            prompts=list(prompts),
            group_size=config.group_size,
            prompt_ids=prompt_batch.input_ids,
            prompt_mask=prompt_batch.attention_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            texts=texts,
            truncated=torch.zeros(len(ids), dtype=torch.bool),
            pad_token_id=tok.pad_token_id,
        )


def mixed_script(prompt: EncodedPrompt) -> list[str]:
    """Four rollouts: correct, wrong (boxed 999), wrong (boxed 998), unformatted."""
    answer = prompt.example.answer
    return [
        f"The answer is \\boxed{{{answer}}}.",
        "I think it is \\boxed{999}.",
        "So the result is \\boxed{998}",
        "I do not know the answer",
    ]


@pytest.fixture
def scripted_engine(processor):
    def make(script=mixed_script):
        return ScriptedRolloutEngine(processor, script)

    return make


@pytest.fixture(scope="session")
def encoded(processor, examples):
    return [encode_prompt(processor, e) for e in examples]


@pytest.fixture(scope="session")
def warm_dir(tmp_path_factory, tiny_dir) -> str:
    path = tmp_path_factory.mktemp("warm") / "tiny-warm"
    return str(build_warm_tiny(path, WarmupConfig(steps=150), base=tiny_dir))
