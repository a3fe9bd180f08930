"""`--preset reference`: the reference code's r- choice and group std, checked against hand-built
references (its teacher context token for token, its advantage loop re-written from its code)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from cepo import config as C
from cepo.config import TeacherConfig, build_config
from cepo.contexts import build_teacher_contexts
from cepo.data import encode_prompt
from cepo.experience import ExperienceConfig, make_experience
from cepo.group_advantages import group_advantages
from cepo.negatives import reference_answer, select_wrong_answers
from cepo.reward import compute_rewards
from cepo.rollout import RolloutConfig

from .test_recipe_blind import reference_context

G = 4


# --------------------------------------------------------------------------- r- choice


@pytest.mark.parametrize("text, expected", [
    ("so x = \\boxed{12}.", "12"),
    ("\\boxed{ \\frac{1}{2} }", "\\frac{1}{2}"),
    ("I do not know", "None"),  # no box: mathruler's string "None"
    ("first \\boxed{3}, then \\boxed{4", "None"),  # only the last box counts, unclosed: "None"
    ("x" * 60 + " \\boxed{}", "x" * 50),  # empty box: the response's first 50 characters
])
def test_reference_answer_reads_responses_as_the_reference(text, expected):
    assert reference_answer(text) == expected


def test_reference_choice_takes_the_lowest_reward_below_half_boxed_or_not():
    texts = ["\\boxed{5}", "\\boxed{7}", "no box here", "\\boxed{8}", "still none"]
    rewards = [1.0, 0.1, 0.0, 0.1, 0.0]
    answers = ["5", "7", None, "8", None]
    accuracy = [1, 0, 0, 0, 0]
    pick = select_wrong_answers(answers, rewards, accuracy, choice="reference", texts=texts)
    assert pick == ["None"]  # worst is unboxed; ties to the first in group order
    assert select_wrong_answers(answers, rewards, accuracy, choice="worst") == ["7"]
    three = select_wrong_answers(answers, rewards, accuracy, choice="reference", texts=texts, k=3)
    assert three == ["None", "7", "8"]  # the two "None" count once
    # rejected = reward below 0.5, not accuracy 0: a 0.5 reward is never r-
    assert select_wrong_answers(["3"], [0.5], [0], choice="reference", texts=["\\boxed{3}"]) == []
    with pytest.raises(ValueError, match="texts"):
        select_wrong_answers(answers, rewards, accuracy, choice="reference")


def test_reference_r_minus_context_matches_the_hand_built_one(processor, scripted_engine,
                                                              grader, examples):
    """Correct, two boxed wrong (0.1) and one unboxed (0): r- is " None", token for token."""
    prompts = [encode_prompt(processor, e) for e in examples[:2]]
    rollouts = scripted_engine().generate(prompts, RolloutConfig(group_size=G))
    rewards = compute_rewards(rollouts.texts, rollouts.ground_truths(), grader)
    assert rewards.reward.tolist()[:G] == pytest.approx([1.0, 0.1, 0.1, 0.0])
    cfg = C.finalize(C.reference())
    ctx = build_teacher_contexts(rollouts, rewards, processor.tokenizer, cfg.teacher)
    assert ctx.wrong_answers == [["None"], ["None"]] and ctx.has_neg.all()
    for p, example in enumerate(examples[:2]):
        neg = reference_context(processor, example, " None")
        pos = reference_context(processor, example, f" {example.answer}")
        for row in range(p * G, (p + 1) * G):
            assert ctx.neg[0][row].input_ids.tolist() == neg.tolist()
            assert ctx.pos[row].input_ids.tolist() == pos.tolist()
            assert ctx.neg[0][row].pixel_values is None
    # the paper's choice never takes the unboxed rollout
    paper = build_teacher_contexts(rollouts, rewards, processor.tokenizer, TeacherConfig())
    assert paper.wrong_answers == [["999"], ["999"]]


# --------------------------------------------------------------------------- group std


def verl_grpo_advantages(scores: torch.Tensor, index: list[int], eps: float = 1e-6):
    """The reference's GRPO outcome advantage (verl), re-written from its code."""
    scores = scores.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            stacked = torch.stack(id2score[idx])
            id2mean[idx], id2std[idx] = torch.mean(stacked), torch.std(stacked)
    for i in range(scores.shape[0]):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return scores


def test_reference_group_std_matches_verl_bit_for_bit():
    f = torch.float32
    groups = [[0.1] * 8, [1.0, 0.1, 0.0, 0.1, 1.0, 0.0, 0.0, 0.1], [0.0] * 8, [1.0] * 8,
              [0.1] * 7 + [0.0]]
    rewards = 0.9 * torch.tensor([[x == 1.0 for x in g] for g in groups], dtype=f).view(-1) + \
        0.1 * torch.tensor([[x > 0 for x in g] for g in groups], dtype=f).view(-1)
    index = [p for p in range(len(groups)) for _ in range(8)]
    ours = group_advantages(rewards, 8, uniform_zero=False)
    assert torch.equal(ours, verl_grpo_advantages(rewards, index))
    assert ours[:8].abs().min() > 1e-3  # a uniform 0.1 group keeps a tiny A ...
    assert ours[:8].tolist() == pytest.approx([-0.0074] * 8, abs=1e-4)
    default = group_advantages(rewards, 8)
    assert (default[:8] == 0).all()  # ... which the default zeroes
    assert (ours[16:32] == 0).all() and (default[16:32] == 0).all()  # 0s and 1s are exact
    torch.testing.assert_close(default[8:16], ours[8:16], atol=1e-6, rtol=0)
    singles = torch.tensor([0.5, 1.0])
    assert torch.equal(group_advantages(singles, 1, uniform_zero=False),
                       verl_grpo_advantages(singles, [0, 1]))


def test_reference_std_reaches_the_experience_step(model, processor, examples, grader,
                                                   scripted_engine):
    def formatted_wrong(prompt):  # eight rewards of 0.1: their fp32 mean is not 0.1
        return [f"\\boxed{{{990 + i}}}" for i in range(8)]

    engine = scripted_engine(formatted_wrong)
    cfg = ExperienceConfig(rollout=RolloutConfig(group_size=8), uniform_zero=False,
                           teacher=TeacherConfig(neg_choice="reference", teacher_images=False))
    experience = make_experience(model, processor, examples[:1], lam=0.5, config=cfg, engine=engine,
                          grader=grader)
    expected = verl_grpo_advantages(experience.rewards.reward, [0] * 8)
    assert torch.equal(experience.advantages, expected) and (expected != 0).all()
    assert experience.wrong_answers == [["990"]] and experience.scores.teacher_scored.all()


# --------------------------------------------------------------------------- the preset


def test_reference_preset_teacher_images_follow_the_algorithm():
    assert build_config(["--preset", "reference"]).teacher.teacher_images is False
    assert build_config(["--preset", "reference", "--algo", "rlsd"]).teacher.teacher_images
    assert build_config(["--preset", "reference", "--teacher_images", "true"]).teacher.\
        teacher_images
    paper = build_config(["--preset", "paper"])
    assert paper.teacher.teacher_images and paper.teacher.neg_choice == "worst"
    assert paper.advantage.uniform_zero
