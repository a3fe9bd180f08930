"""CEPO in your own PyTorch loop: three calls on top of a GRPO step.

    1. teacher contexts        prompt + hint(answer) + response, once with the ground truth (r+)
                               and once with a wrong answer from the same group (r-)
    2. contrastive_evidence    student / r+ / r- hidden states + lm_head weight → Â per token
                               (and the student's log-probs, the PPO old log-probs)
    3. CEPOLoss                hidden states with grad + Â → dual-clip PPO loss → backward

Runs on the CPU in seconds on the tiny random Qwen3-VL of `cepo.offline.tiny`:

    python examples/custom_loop.py --steps 2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

from cepo.grading import extract_boxed
from cepo.negatives import select_wrong_answers
from cepo.offline.tiny import build_tiny_model
from cepo_kernels import CEPOLoss, contrastive_evidence

LAMBDA_INIT, WARMUP, EPS_W = 0.5, 25, 0.5  # docs/METHOD.md, "Presets", paper preset
# docs/METHOD.md, "Teachers": the assistant turn starts with the answer, then the response
HINT = " {answer}"


def hidden_before_head(model, batch: dict, response_len: int) -> torch.Tensor:
    """Hidden states [B, T, D] that predict the last T tokens (the response) of every row."""
    out = model.model(**batch, use_cache=False)
    return out.last_hidden_state[:, -response_len - 1: -1]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model-dir", default=None,
                        help="tiny model directory (default: built in a temporary folder, removed "
                             "at the end)")
    args = parser.parse_args(argv)
    if args.model_dir is not None:
        return train(build_tiny_model(args.model_dir), args.steps)
    with tempfile.TemporaryDirectory(prefix="cepo-tiny-") as tmp:
        return train(build_tiny_model(Path(tmp) / "model"), args.steps)


def train(model_dir, steps: int) -> list[dict]:
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).train()
    weight = model.get_output_embeddings().weight  # [V, D] lm_head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = CEPOLoss(clip_low=0.2, clip_high=0.28, clip_dual=3.0)

    # One prompt, one group of G responses. A real loop samples them (model.generate) each step;
    # fixed texts keep the demo deterministic and give the group a wrong answer to contrast with.
    question = "What is the sum of 14 and 27? Put ONLY the final answer inside \\boxed{}."
    truth = "41"
    prompt = torch.tensor(tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True,
        return_dict=True)["input_ids"])  # [P], ends with the assistant header
    texts = ["14 + 27 = \\boxed{41}", "The sum is \\boxed{31}.", "So \\boxed{40}", "I do not know"]
    answers = [extract_boxed(t) for t in texts]
    accuracy = [float(a == truth) for a in answers]
    rewards = torch.tensor([0.9 * acc + 0.1 * (a is not None) for a, acc in zip(answers, accuracy)])
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-6)  # [G] GRPO advantages A_i
    wrong = select_wrong_answers(answers, rewards.tolist(), accuracy)[0]  # r-: worst rejected

    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    response = torch.full((len(ids), width), tok.pad_token_id)  # [G, T], right-padded
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for row, x in enumerate(ids):
        response[row, : len(x)], mask[row, : len(x)] = torch.tensor(x), True
    labels = response.masked_fill(~mask, -100)

    def rows(hint_answer: str | None) -> dict:  # G rows of [prompt (+ hint) | response]
        context = prompt
        if hint_answer is not None:
            hint = tok(HINT.format(answer=hint_answer), add_special_tokens=False)["input_ids"]
            context = torch.cat([prompt, torch.tensor(hint)])
        # every row has the same context, so all responses start in the same column
        context = context.expand(len(ids), -1)
        return {"input_ids": torch.cat([context, response], dim=1),
                "attention_mask": torch.cat([torch.ones_like(context), mask.long()], dim=1)}

    history = []
    for step in range(1, steps + 1):
        lam = LAMBDA_INIT * max(0.0, 1.0 - (step - 1) / WARMUP)  # docs/METHOD.md, "Schedules"

        # 1. teacher contexts: the same response after the ground truth and after r-
        student, pos, neg = rows(None), rows(truth), rows(wrong)
        model.eval()
        with torch.no_grad():
            hidden = [hidden_before_head(model, b, width) for b in (student, pos, neg)]
        model.train()

        # 2. Â_t = A · [(1 − λ) + λ · clip(exp(sign(A)·(log P_T+ − log P_T−)), 1 ± ε_w)]
        ev = contrastive_evidence(*hidden, weight, labels, advantages, mask=mask, lam=lam,
                                  eps_w=EPS_W)

        # 3. the policy loss from fresh hidden states (fused log-probs, no N×V logits)
        out = loss_fn(hidden_before_head(model, student, width), weight, labels, ev.policy,
                      ev.advantages, mask)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

        history.append({"step": step, "lambda": lam, "loss": out.loss.item(),
                        "advantages": advantages, "token_advantages": ev.advantages,
                        "delta": ev.delta, "mask": mask, "backend": ev.backend})
        print(f"step {step}: λ={lam:.3f} loss={out.loss.item():+.5f} r-={wrong!r} "
              f"mean|Δ|={ev.delta[mask].abs().mean().item():.4f} backend={ev.backend}")
    return history


if __name__ == "__main__":
    main()
