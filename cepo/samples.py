"""A few rollouts per step with their per-token credit, for reading what CEPO rewards.

``<run_dir>/samples.jsonl`` gets, per step, the best and the worst rollout of the first groups
that mix rewards (the only rollouts whose tokens the teachers reweight): the problem, the ground
truth, the wrong answer r- the teachers were told, the response, its reward and advantage A, and
every response token with Δ_t (log P_T+ − log P_T−), its weight w_t and its advantage Â_t.
Tokens with w_t far from 1 are the decisive steps; filler stays at 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cepo.metrics import truncate
from cepo.rundir import inside

SAMPLES_FILE = "samples.jsonl"


def pick_rollouts(experience, count: int) -> list[int]:
    """Rows to show: the highest- and lowest-advantage rollout of the first groups that mix
    rewards, up to `count` rows."""
    group = experience.rollouts.group_size
    rows: list[int] = []
    for start in range(0, experience.rollouts.num_rollouts, group):
        adv = experience.advantages[start : start + group]
        if len(rows) >= count:
            break
        if bool((adv != 0).any()):
            best, worst = start + int(adv.argmax()), start + int(adv.argmin())
            rows += [best, worst][: count - len(rows)]
    return rows


def sample_records(experience, tokenizer, step: int, count: int) -> list[dict[str, Any]]:
    """The JSON records of `pick_rollouts`; decimals rounded to keep the file readable."""
    rollouts, scores = experience.rollouts, experience.scores
    records = []
    for row in pick_rollouts(experience, count):
        prompt = rollouts.prompts[row // rollouts.group_size]
        mask = rollouts.response_mask[row].bool()
        ids = rollouts.response_ids[row][mask].tolist()
        wrong = experience.wrong_answers[row // rollouts.group_size]
        records.append({
            "step": step,
            "rollout": row,
            "problem": prompt.example.problem,
            "answer": prompt.example.answer,
            "wrong_answer": wrong[0] if wrong else None,
            "response": rollouts.texts[row],
            "reward": round(float(experience.rewards.reward[row]), 4),
            "advantage": round(float(experience.advantages[row]), 4),
            "teachers": bool(scores.teacher_scored[row]),
            "tokens": [
                [tokenizer.decode([tok]), round(float(d), 4), round(float(w), 4),
                 round(float(a), 4)]
                for tok, d, w, a in zip(ids, scores.delta[row][mask],
                                        scores.token_weight[row][mask],
                                        scores.token_advantages[row][mask])
            ],
        })
    return records


class SampleWriter:
    """Appends `sample_records` to ``<run_dir>/samples.jsonl`` (main process; a resumed run first
    drops the records of steps after its checkpoint, like metrics.jsonl)."""

    def __init__(self, run_dir: str | Path, count: int, *, enabled: bool = True,
                 resume_step: int = 0):
        self.count = count
        self.enabled = enabled and count > 0
        self.path = Path(run_dir) / SAMPLES_FILE
        if not self.enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = inside(run_dir, SAMPLES_FILE)
        if resume_step:
            truncate(self.path, resume_step)
        else:
            self.path.write_text("")

    def write(self, experience, tokenizer, step: int) -> None:
        if not self.enabled:
            return
        records = sample_records(experience, tokenizer, step, self.count)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
