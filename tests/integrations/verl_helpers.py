"""Shared pieces of the verl plug-in tests: a character tokenizer and verl-shaped rollout rows."""

from __future__ import annotations

import torch

CHARS = " 0123456789abcdefghijklmnopqrstuvwxyz+=?{}\\."


class CharTokenizer:
    """One token per character (id 0 is padding), with the two calls the CEPO step makes."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [CHARS.index(c) + 1 for c in text]}

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self(text)["input_ids"], dtype=torch.int64)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(CHARS[i - 1] for i in row if i > 0) for row in rows]


# Two groups of three rollouts and one of two. Group "g0": one right, two wrong with boxed
# answers (r- = the lowest-reward one, "5"); group "g1": wrong rollouts without a boxed answer
# (no r-: the fallback group); group "g2": all right (A = 0, no teachers).
GROUPS = {
    "g0": ("what is 2+2?", "4", [("so \\boxed{4}", 1.0), ("\\boxed{5}", 0.0),
                                 ("maybe \\boxed{6}.", 0.0)]),
    "g1": ("what is 3+3?", "6", [("\\boxed{6}", 1.0), ("no idea", 0.0), ("seven", 0.0)]),
    "g2": ("what is 1+1?", "2", [("\\boxed{2}", 1.0), ("it is \\boxed{2}", 1.0)]),
}
RESPONSE_MASK_HOLE = ("g0", 2, 1)  # (group, rollout, position): a 0 inside a response mask


def verl_rows(tok: CharTokenizer) -> list[dict]:
    """One dict per rollout, with the fields verl's agent loop puts in TransferQueue, in an
    interleaved (balanced-batch) order rather than group by group."""
    rows = []
    for uid, (prompt, truth, rollouts) in GROUPS.items():
        for s, (text, score) in enumerate(rollouts):
            p, r = tok.encode(prompt), tok.encode(text)
            mask = torch.ones_like(r)
            if (uid, s) == RESPONSE_MASK_HOLE[:2]:
                mask[RESPONSE_MASK_HOLE[2]] = 0
            scores = torch.zeros(len(r))
            scores[-1] = score
            ids = torch.cat([p, r])
            rows.append({
                "key": f"{uid}_{s}_0", "uid": uid, "prompts": p, "responses": r,
                "response_mask": mask, "loss_mask": mask, "input_ids": ids,
                "position_ids": torch.arange(len(ids)), "rm_scores": scores,
                "reward_model": {"ground_truth": truth},
                "extra_fields": {"reward_extra_info": {"acc": score}},
            })
    order = [0, 3, 6, 1, 4, 7, 2, 5]  # rows of a group are not adjacent
    return [rows[i] for i in order]


def expected_grpo(scores: list[float]) -> list[float]:
    """(R - mean) / (std + 1e-6), unbiased std; 0 for an all-equal group (written out here)."""
    n = len(scores)
    mean = sum(scores) / n
    if all(s == scores[0] for s in scores):
        return [0.0] * n
    std = (sum((s - mean) ** 2 for s in scores) / (n - 1)) ** 0.5
    return [(s - mean) / (std + 1e-6) for s in scores]


def expected_a_hat(a: float, pos: torch.Tensor, neg: torch.Tensor, lam: float,
                   eps_w: float) -> torch.Tensor:
    """A · [(1 − λ) + λ · clip(exp(sign(A)·(pos − neg)), 1 − ε_w, 1 + ε_w)], written out."""
    sign = (a > 0) - (a < 0)
    w = torch.exp(sign * (pos.double() - neg.double())).clamp(1 - eps_w, 1 + eps_w)
    return a * ((1 - lam) + lam * w)
