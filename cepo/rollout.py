"""Sampling G completions per prompt.

`RolloutEngine` is the small interface the experience step talks to; `HFRolloutEngine` implements
it with Hugging Face `generate` (left padding, sampling, EOS handling). A faster engine (vLLM,
continuous batching) only has to return the same `Rollouts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from cepo.batch import ModelInputs, collate
from cepo.config import RolloutConfig
from cepo.data import EncodedPrompt
from cepo.models import unwrap_model


@dataclass(frozen=True)
class EvalRolloutConfig(RolloutConfig):
    """Sampling with the evaluation-only knobs of the paper's benchmarks (lmms-eval via vLLM).
    Training never uses them: a truncated or penalised sampler is not the policy being trained."""

    top_k: int = 0  # 0: off
    presence_penalty: float = 0.0  # vLLM's: subtracted once from every token already generated

    def __post_init__(self):
        super().__post_init__()
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")


class PresencePenalty:
    """vLLM's presence penalty as a `generate` logits processor: every token id that already
    occurs in the generated part (columns from `prompt_width` on, never the prompt) loses
    `penalty` from its logit. It runs before temperature, top-k and top-p, as in vLLM."""

    def __init__(self, penalty: float, prompt_width: int):
        self.penalty = float(penalty)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool)
        seen.scatter_(1, generated, True)
        return scores - self.penalty * seen.to(scores.dtype)


@dataclass
class Rollouts:
    """N = P x G sampled completions, grouped: rows [g*G, (g+1)*G) answer prompt g."""

    prompts: list[EncodedPrompt]  # P prompts (with their images and ground truths)
    group_size: int  # G
    prompt_ids: torch.Tensor  # [N, Lp] int64, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [N, Lp] int64, 0 on padding
    response_ids: torch.Tensor  # [N, T] int64, right-padded with pad_token_id after the EOS
    response_mask: torch.Tensor  # [N, T] int64, 1 on generated tokens up to and incl. the EOS
    texts: list[str]  # N decoded responses, special tokens removed
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without an EOS
    pad_token_id: int

    @property
    def num_rollouts(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_index(self) -> torch.Tensor:
        """[N] int64: the prompt each rollout answers."""
        return torch.arange(len(self.prompts)).repeat_interleave(self.group_size)

    def ground_truths(self) -> list[str]:
        """N ground-truth answers, one per rollout."""
        return [p.example.answer for p in self.prompts for _ in range(self.group_size)]

    def student_inputs(
        self, rows: Sequence[int] | None = None, *, width: int | None = None
    ) -> ModelInputs:
        """`[prompt | response]` for `rows` (default: all), the response in the last columns.

        `width` keeps only the first `width` response columns (a micro-batch whose responses are
        all shorter than T need not carry the batch-wide padding).
        """
        rows = list(range(self.num_rollouts)) if rows is None else list(rows)
        width = self.response_ids.shape[1] if width is None else width
        prefixes = [self.prompts[r // self.group_size].prefix() for r in rows]
        return collate(
            prefixes,
            self.pad_token_id,
            self.response_ids[rows, :width],
            self.response_mask[rows, :width],
        )


class RolloutEngine(Protocol):
    """Anything that turns P encoded prompts into P x G grouped `Rollouts`."""

    def generate(self, prompts: Sequence[EncodedPrompt], config: RolloutConfig) -> Rollouts: ...


class HFRolloutEngine:
    """Rollouts with `model.generate` on the training model itself (plain or peft-wrapped)."""

    def __init__(self, model: torch.nn.Module, processor):
        self.model = model
        self.processor = processor
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; left padding needs one")
        self.pad_token_id = tokenizer.pad_token_id
        eos = unwrap_model(model).generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("neither the generation config nor the tokenizer names an EOS token")
        self.eos_token_ids = eos
        # A sampled image/video placeholder would be taken for an image slot by every later
        # forward ("image features and image tokens do not match"), so they are never sampled.
        config = unwrap_model(model).config
        self.suppressed_ids = sorted(
            {
                getattr(config, name)
                for name in (
                    "image_token_id",
                    "video_token_id",
                    "vision_start_token_id",
                    "vision_end_token_id",
                )
                if getattr(config, name, None) is not None
            }
        )

    @torch.no_grad()
    def generate(self, prompts: Sequence[EncodedPrompt], config: RolloutConfig) -> Rollouts:
        if not prompts:
            raise ValueError("no prompts to roll out")
        rows = [p for p in prompts for _ in range(config.group_size)]
        chunk = config.generation_batch_size or len(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            pieces = [
                self._generate(rows[i : i + chunk], config) for i in range(0, len(rows), chunk)
            ]
        finally:
            self.model.train(was_training)
        prompt_ids = _cat_padded([p[0] for p in pieces], self.pad_token_id, left=True)
        prompt_mask = _cat_padded([p[1] for p in pieces], 0, left=True)
        response_ids = _cat_padded([p[2] for p in pieces], self.pad_token_id, left=False)
        response_mask, truncated = self._mask_after_eos(response_ids)
        response_ids = response_ids.masked_fill(~response_mask.bool(), self.pad_token_id)
        width = max(int(response_mask.sum(1).max()), 1)  # drop all-padding columns
        response_ids, response_mask = response_ids[:, :width], response_mask[:, :width]
        texts = self.processor.tokenizer.batch_decode(
            [ids[m.bool()] for ids, m in zip(response_ids, response_mask)], skip_special_tokens=True
        )
        return Rollouts(
            prompts=list(prompts),
            group_size=config.group_size,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            texts=texts,
            truncated=truncated,
            pad_token_id=self.pad_token_id,
        )

    def _generate(self, rows: Sequence[EncodedPrompt], config: RolloutConfig):
        inputs = collate([p.prefix() for p in rows], self.pad_token_id)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        inputs = inputs.to(device)
        kwargs = {}
        if inputs.pixel_values is not None:
            kwargs = {
                "pixel_values": inputs.pixel_values.to(dtype),
                "image_grid_thw": inputs.image_grid_thw,
            }
        sampling = config.temperature > 0
        penalty = getattr(config, "presence_penalty", 0.0)
        if penalty:
            kwargs["logits_processor"] = [PresencePenalty(penalty, inputs.input_ids.shape[1])]
        out = self.model.generate(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            mm_token_type_ids=inputs.mm_token_type_ids,
            do_sample=sampling,
            # Explicit values so that a checkpoint's own defaults (Qwen3-VL ships top_k 20,
            # top_p 0.8, temperature 0.7) never leak into the RL sampling distribution.
            temperature=config.temperature if sampling else None,
            top_p=config.top_p if sampling else None,
            top_k=getattr(config, "top_k", 0) if sampling else None,
            repetition_penalty=1.0,
            suppress_tokens=self.suppressed_ids or None,
            max_new_tokens=config.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            **kwargs,
        )  # [B, Lp + T']
        width = inputs.input_ids.shape[1]
        return inputs.input_ids.cpu(), inputs.attention_mask.cpu(), out[:, width:].cpu()

    def _mask_after_eos(self, response_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, T] mask up to and including the first EOS, and [N] truncated (no EOS)."""
        is_eos = torch.isin(response_ids, torch.tensor(self.eos_token_ids))  # [N, T]
        seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly earlier
        return (~seen_before).long(), ~is_eos.any(1)


def _cat_padded(pieces: list[torch.Tensor], pad: int, *, left: bool) -> torch.Tensor:
    """Concatenate [b_i, L_i] tensors along rows, padding each to the widest (left or right)."""
    width = max(p.shape[1] for p in pieces)
    padded = []
    for p in pieces:
        fill = p.new_full((p.shape[0], width - p.shape[1]), pad)
        padded.append(torch.cat([fill, p] if left else [p, fill], dim=1))
    return torch.cat(padded)
