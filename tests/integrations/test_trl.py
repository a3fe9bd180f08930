"""`CEPOGRPOTrainer`: real `train()` runs of TRL on tiny models on the CPU.

What is checked: per-token advantages reach TRL's loss unchanged; they differ from TRL's GRPO
advantages where the teachers disagree and equal them where they agree or λ = 0 (then the run is
TRL's GRPO run exactly); r- comes from the right rollout of the group; the student stream lines
up token for token with TRL's own log-probs (text, PEFT, Qwen3-VL with images); λ follows the
global step across a checkpoint resume; impossible set-ups fail at construction.
"""

from __future__ import annotations

import math
import subprocess
import sys
from unittest import mock

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore:You are using 'rollout_func'")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from cepo.batch import collate
from cepo.grading import extract_boxed
from cepo.integrations.trl import CEPOConfig, CEPOGRPOTrainer
from cepo.integrations.trl.teachers import backbone_hidden, row_prefixes
from cepo.schedule import lam_at
from cepo_kernels import fused_linear_logprobs
from tests.helpers import load_example

G = 4  # group size
SCRIPT = ("The answer is \\boxed{{{answer}}}.", "I think it is \\boxed{{999}}.",
          "So the result is \\boxed{{998}}", "I do not know the answer")


# ---------------------------------------------------------------------------- set-up


def _args(tmp_path, config_cls=CEPOConfig, **overrides):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=G,
                num_generations=G, max_completion_length=8, max_steps=2, report_to="none",
                use_cpu=True, logging_steps=1, save_strategy="no", gradient_checkpointing=False,
                bf16=False, learning_rate=1e-3, seed=0, dataloader_num_workers=0)
    if config_cls is CEPOConfig:
        base["cepo_lambda_warmup_steps"] = 2
    base.update(overrides)
    return config_cls(**base)


def _text_dataset(n=4):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
                               "answer": str(2 * i)} for i in range(1, n + 1)])


def _vl_dataset(n=2):
    """The VL drop-in example's dataset (one builder for the example and the tests)."""
    return load_example("trl_cpu").vl_dataset(n)


def length_reward(completions, **kwargs):
    """A reward with spread inside every group, whatever a random model writes."""
    return [float(len(c[0]["content"]) % 5) for c in completions]


def script_reward(completions, answer, **kwargs):
    """1 correct, 0.1 formatted, 0 else; '998' a little worse, so it is the worst rejected."""
    out = []
    for c, truth in zip(completions, answer):
        boxed = extract_boxed(c[0]["content"])
        r = 1.0 if boxed == truth else (0.1 if boxed is not None else 0.0)
        out.append(r - 0.05 * (boxed == "998"))
    return out


def scripted_rollouts(answers: dict[str, str]):
    """A TRL `rollout_func`: each group answers right, 999, 998, and nothing (in that order)."""

    def rollout(prompts, trainer):
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
        tok = trainer._tokenizer
        completion_ids = []
        for i, prompt in enumerate(prompts):
            text = SCRIPT[i % G].format(answer=answers[prompt[-1]["content"]])
            completion_ids.append(tok(text, add_special_tokens=False)["input_ids"]
                                  + [tok.eos_token_id])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


class _Recorder:
    """Mixin: keeps each training batch as built, what `_compute_loss` received, and CEPO's view."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.rec_batches.append((out, [x.get("answer") for x in inputs],
                                     getattr(self, "rec_verdicts", None)))
            self.rec_cepo.append(getattr(self, "cepo_last", None))
        return out

    def _calculate_rewards(self, *args):
        rewards = super()._calculate_rewards(*args)
        self.rec_verdicts = getattr(self, "_cepo_verdicts", None)
        return rewards

    def _compute_loss(self, model, inputs):
        keys = ("advantages", "prompt_ids", "completion_ids", "completion_mask")
        self.rec_loss.append({k: inputs[k].detach().cpu() for k in keys})
        return super()._compute_loss(model, inputs)


class RecordingCEPO(_Recorder, CEPOGRPOTrainer):
    rec_batches, rec_cepo, rec_loss = None, None, None


class RecordingGRPO(_Recorder, GRPOTrainer):
    rec_batches, rec_cepo, rec_loss = None, None, None


def _train(cls, resume=None, **kwargs):
    trainer = cls(**kwargs)
    trainer.rec_batches, trainer.rec_cepo, trainer.rec_loss = [], [], []
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _row_key(prompt_ids, completion_ids):
    return (tuple(prompt_ids.tolist()), tuple(completion_ids.tolist()))


def _loss_rows_match(loss_inputs, reference, width):
    """Every row the loss saw carries exactly the reference advantages of that row."""
    table = {_row_key(p, c): a for p, c, a in zip(reference.prompt_ids, reference.completion_ids,
                                                  reference.advantages)}
    assert loss_inputs["advantages"].shape == loss_inputs["completion_ids"].shape
    assert loss_inputs["advantages"].shape[1] == width
    for p, c, a in zip(loss_inputs["prompt_ids"], loss_inputs["completion_ids"],
                       loss_inputs["advantages"]):
        assert torch.equal(a, table[_row_key(p, c)])


def _check_cepo_advantages(cepo, eps_w):
    """docs/METHOD.md, "Guarantees" on the advantages handed to TRL: sign, bounds, 0 at padding,
    ≠ A where Δ ≠ 0."""
    mask = cepo.mask
    a = cepo.grpo_advantages[:, None] * mask
    assert (cepo.advantages[~mask] == 0).all()
    scored = cepo.scored[:, None] & mask
    assert torch.equal(torch.sign(cepo.advantages[scored]), torch.sign(a[scored]))
    bound = cepo.lam * eps_w * a.abs() + 1e-6
    assert ((cepo.advantages - a).abs() <= bound).all()
    assert torch.equal(cepo.advantages[~scored], a[~scored])  # no teacher: plain A
    disagree = scored & (cepo.delta.abs() > 1e-4)  # clearly apart (not fp32 rounding noise)
    assert disagree.any(), "the teachers never disagreed: the test would not bite"
    assert (cepo.advantages[disagree] != a[disagree]).all()
    agree = scored & (cepo.delta == 0)
    assert torch.equal(cepo.advantages[agree], a[agree])


@torch.no_grad()
def _assert_student_aligned(trainer, out):
    """Our student rows (unpadded prompt → collate → backbone → fused kernel) give TRL's own
    log-probs for the same completions: the teacher rows are built the same way."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    width = out["completion_ids"].shape[1]
    batch = collate(row_prefixes(out, with_images=True), trainer._tokenizer.pad_token_id,
                    out["completion_ids"], out["completion_mask"])
    model.eval()
    try:
        hidden = backbone_hidden(hf.base_model, batch, width, is_vlm=trainer._is_vlm)
        mask = out["completion_mask"].bool()
        labels = out["completion_ids"].masked_fill(~mask, -100)
        ours = fused_linear_logprobs(hidden, hf.get_output_embeddings().weight, labels,
                                     temperature=trainer.temperature).logprobs
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        extra = {k: out[k] for k in ("pixel_values", "image_grid_thw", "num_images",
                                     "mm_token_type_ids") if k in out}
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, width,
                                                                  **extra)
    finally:
        model.train()
    assert torch.allclose(ours[mask], theirs[mask], atol=2e-4), (ours - theirs)[mask].abs().max()


# ---------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("field, value", [
    ("cepo_algo", "grpo"), ("cepo_lambda_init", 1.5), ("cepo_lambda_warmup_steps", -1),
    ("cepo_eps_w", 1.0), ("cepo_neg_choice", "best"), ("cepo_num_neg", 0),
    ("cepo_neg_fallback", "none"), ("cepo_hint_template", "The answer is"),
    ("cepo_teacher_model", "ema"), ("cepo_answer_column", ""), ("cepo_min_pixels", 0),
    ("cepo_max_pixels", 2.5), ("cepo_min_pixels", 10**8), ("cepo_lambda_offset", -1),
])
def test_config_rejects_bad_values(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        _args(tmp_path, **{field: value})


def test_input_images_are_resized_as_the_reference_before_generation():
    from PIL import Image

    from cepo.integrations.trl import fit_input_images

    image = Image.new("P", (300, 200))
    inputs = [{"prompt": [{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "x?"}]}],
               "images": [image], "answer": "3"}, {"prompt": "text only", "image": image}]
    out = fit_input_images(inputs, 262_144, 4_194_304)
    assert out[0]["images"][0].size == (627, 418) and out[0]["images"][0].mode == "RGB"
    assert out[0]["prompt"][0]["content"][0]["image"].size == (627, 418)
    assert out[0]["prompt"][0]["content"][1] == {"type": "text", "text": "x?"}
    assert out[1]["image"].size == (627, 418) and out[1]["prompt"] == "text only"
    assert inputs[0]["images"][0] is image and out[0]["answer"] == "3"  # dataset untouched
    assert fit_input_images(inputs, None, None) is inputs


def test_rlsd_defaults_are_the_reference_rlsd_script_and_flags_override(tmp_path):
    rlsd = _args(tmp_path, cepo_algo="rlsd", cepo_lambda_warmup_steps=25)
    assert (rlsd.cepo_eps_w, rlsd.cepo_lambda_offset) == (0.2, 1)
    lams = [lam_at(k, 0.5, 25, rlsd.cepo_lambda_offset) for k in range(1, 31)]
    assert lams == pytest.approx([0.5 * max(0.0, 1 - k / 25) for k in range(1, 31)], abs=1e-12)
    cepo = _args(tmp_path)
    assert (cepo.cepo_eps_w, cepo.cepo_lambda_offset) == (0.5, 0)
    mine = _args(tmp_path, cepo_algo="rlsd", cepo_eps_w=0.5, cepo_lambda_offset=0)
    assert (mine.cepo_eps_w, mine.cepo_lambda_offset) == (0.5, 0)


def test_importing_cepo_kernels_does_not_import_trl():
    code = ("import sys, cepo_kernels, cepo.integrations; "
            "assert 'trl' not in sys.modules, 'trl imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_construction_errors(tmp_path, tiny_text_dir):
    ds = _text_dataset()
    kw = dict(model=tiny_text_dir, reward_funcs=length_reward, train_dataset=ds)
    with pytest.raises(TypeError, match="CEPOConfig"):
        CEPOGRPOTrainer(args=_args(tmp_path, GRPOConfig), **kw)
    with pytest.raises(ValueError, match="no answer column 'solution'"):
        CEPOGRPOTrainer(args=_args(tmp_path, cepo_answer_column="solution"), **kw)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        CEPOGRPOTrainer(args=_args(tmp_path, remove_unused_columns=True), **kw)
    with pytest.raises(NotImplementedError, match="tools"):
        CEPOGRPOTrainer(args=_args(tmp_path), tools=[length_reward], **kw)
    args = _args(tmp_path)
    args.loss_type = "some_future_loss"
    with pytest.raises(ValueError, match="per-token"):
        CEPOGRPOTrainer(args=args, **kw)
    with pytest.raises(ValueError, match="PEFT"):
        CEPOGRPOTrainer(args=_args(tmp_path, cepo_teacher_model="base"), **kw)


# ---------------------------------------------------------------------------- train() runs


def test_text_model_trains_with_per_token_advantages_and_resumes(tmp_path, tiny_text_dir):
    args = _args(tmp_path, save_strategy="steps", save_steps=1)
    trainer = _train(RecordingCEPO, model=tiny_text_dir, reward_funcs=length_reward, args=args,
                     train_dataset=_text_dataset())
    assert [(c.generation, c.lam) for c in trainer.rec_cepo] == [(1, 0.5), (2, 0.25)]
    for seen, cepo in zip(trainer.rec_loss, trainer.rec_cepo):
        assert seen["advantages"].dim() == 2  # (B, T) reached TRL's loss
        _loss_rows_match(seen, cepo, cepo.completion_ids.shape[1])
        _check_cepo_advantages(cepo, args.cepo_eps_w)
    logged = [h for h in trainer.state.log_history if "cepo/lambda" in h]
    assert [h["cepo/lambda"] for h in logged] == [0.5, 0.25]
    assert all(math.isfinite(h["cepo/delta_mean"]) and 0 <= h["cepo/weight_clip_frac"] <= 1
               for h in logged)
    _assert_student_aligned(trainer, trainer.rec_batches[-1][0])

    # resume from the checkpoint after step 1: the next generation is k = 2, λ = 0.25
    resumed = _train(RecordingCEPO, model=tiny_text_dir, reward_funcs=length_reward, args=args,
                     train_dataset=_text_dataset(), resume=str(tmp_path / "out" / "checkpoint-1"))
    assert [(c.generation, c.lam) for c in resumed.rec_cepo] == [(2, 0.25)]


def test_wrong_answer_teacher_from_scripted_groups_with_peft(tmp_path, tiny_text_dir):
    from peft import LoraConfig

    ds = _text_dataset(2)
    answers = {row["prompt"][-1]["content"]: row["answer"] for row in ds}
    args = _args(tmp_path)
    trainer = _train(RecordingCEPO, model=tiny_text_dir, reward_funcs=script_reward, args=args,
                     train_dataset=ds, rollout_func=scripted_rollouts(answers),
                     peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    for seen, cepo in zip(trainer.rec_loss, trainer.rec_cepo):
        assert cepo.wrong_answers == [["998"]] * G  # the worst rejected rollout with an answer
        assert cepo.scored.all()
        _loss_rows_match(seen, cepo, cepo.completion_ids.shape[1])
        _check_cepo_advantages(cepo, args.cepo_eps_w)
    assert [h["cepo/frac_groups_with_neg"] for h in trainer.state.log_history
            if "cepo/frac_groups_with_neg" in h] == [1.0, 1.0]
    out, truths, verdicts = trainer.rec_batches[-1]
    _assert_student_aligned(trainer, out)  # the LoRA adapters are in the scoring path

    # variants re-scored on the recorded batch (no new generation)
    out = dict(out, advantages=trainer.rec_cepo[-1].grpo_advantages)

    def score(verdicts=verdicts, **settings):
        for name, value in settings.items():
            setattr(trainer.args, name, value)
        try:
            a_hat = trainer._cepo_advantages(out, truths, verdicts, 1, 0.5)
            return a_hat, trainer.cepo_last
        finally:
            for name in settings:
                setattr(trainer.args, name, getattr(CEPOConfig, name))

    a = out["advantages"][:, None] * out["completion_mask"]
    _, two = score(cepo_num_neg=2)
    assert two.wrong_answers == [["998", "999"]] * G
    _, frequent = score(cepo_neg_choice="most_frequent")
    assert frequent.wrong_answers == [["999"]] * G  # 1:1 tie → first in group order
    no_wrong = type(verdicts)([None] * len(verdicts.answers), verdicts.accuracy, verdicts.rewards)
    positive, _ = score(no_wrong, cepo_neg_fallback="positive")
    assert torch.equal(positive, a)  # r- = r+ → Δ = 0 → GRPO
    student, _ = score(no_wrong, cepo_neg_fallback="student")
    rlsd, _ = score(cepo_algo="rlsd")
    assert torch.allclose(student, rlsd, atol=1e-6) and not torch.allclose(student, a)
    base, _ = score(cepo_teacher_model="base")  # adapters off for the teachers only
    actor, _ = score()
    assert not torch.equal(base, actor)
    # each prompt encoded once (the default, one process) vs every row whole: the same Â
    import cepo.prefix as prefix_module

    for kw in ({}, {"cepo_teacher_model": "base"}, {"cepo_num_neg": 2}):
        with mock.patch.object(prefix_module, "encode_prefix",
                               wraps=prefix_module.encode_prefix) as encode:
            shared = score(**kw)[0]
        assert 0 < encode.call_count < 3 * G  # per pass: one per prompt, not one per row
        unshared = score(cepo_prefix_sharing="false", **kw)[0]
        torch.testing.assert_close(shared, unshared, atol=2e-5, rtol=1e-4)
    # multi-process mode: every row and stream is run (same forwards on every rank), same Â
    trainer._cepo_uniform = lambda: True
    assert torch.allclose(score()[0], actor, atol=1e-6)
    assert torch.allclose(score(no_wrong)[0], student, atol=1e-6)


def test_lambda_zero_or_eps_zero_is_trl_grpo(tmp_path, tiny_text_dir):
    ds = _text_dataset(2)
    answers = {row["prompt"][-1]["content"]: row["answer"] for row in ds}

    def run(cls, sub, **cfg):
        config_cls = CEPOConfig if cls is RecordingCEPO else GRPOConfig
        return _train(cls, model=tiny_text_dir, reward_funcs=script_reward,
                      args=_args(tmp_path / sub, config_cls, **cfg), train_dataset=ds,
                      rollout_func=scripted_rollouts(answers))

    grpo = run(RecordingGRPO, "grpo")
    lam0 = run(RecordingCEPO, "lam0", cepo_lambda_init=0.0)
    eps0 = run(RecordingCEPO, "eps0", cepo_eps_w=0.0)
    assert lam0.rec_cepo == [None, None]  # no teacher pass at all
    assert [c.lam for c in eps0.rec_cepo] == [0.5, 0.25]
    for step in range(2):
        ref = {_row_key(p, c): a for p, c, a in zip(*(grpo.rec_loss[step][k] for k in (
            "prompt_ids", "completion_ids", "advantages")))}
        for run_ in (lam0, eps0):
            seen = run_.rec_loss[step]
            for p, c, a, m in zip(seen["prompt_ids"], seen["completion_ids"], seen["advantages"],
                                  seen["completion_mask"]):
                expected = ref[_row_key(p, c)]
                assert torch.equal(a, expected) if a.dim() == 0 else \
                    torch.equal(a, expected * m)  # per token, exactly A on every token
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (grpo, lam0, eps0)]
    assert losses[0] == losses[1] == losses[2]


def test_qwen3_vl_with_images(tmp_path, tiny_vl_dir):
    from transformers.image_utils import SizeDict

    from cepo.models import load_model, load_processor

    processor = load_processor(tiny_vl_dir)
    processor.image_processor.size = SizeDict(shortest_edge=1024, longest_edge=128 * 128)
    # groups of 2: every batch holds two prompts with different images, so a row given the
    # wrong image's pixels would show in the alignment check
    # the pixel range reaches TRL's generation: the 64×64 images become 128×128 (16 tokens)
    args = _args(tmp_path, max_completion_length=6, num_generations=2,
                 cepo_min_pixels=128 * 128, cepo_max_pixels=128 * 128)
    trainer = _train(RecordingCEPO, model=load_model(tiny_vl_dir, device="cpu"),
                     reward_funcs=length_reward, args=args, train_dataset=_vl_dataset(4),
                     processing_class=processor)
    for seen, cepo in zip(trainer.rec_loss, trainer.rec_cepo):
        assert seen["advantages"].dim() == 2
        _loss_rows_match(seen, cepo, cepo.completion_ids.shape[1])
        _check_cepo_advantages(cepo, args.cepo_eps_w)
    out, truths, verdicts = trainer.rec_batches[-1]
    assert out["pixel_values"] is not None
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]] * len(out["image_grid_thw"])
    _assert_student_aligned(trainer, out)  # mRoPE positions and per-row pixels line up

    # image-blind teachers (the reference code's setting): pads for the image tokens, no pixels
    tok = processor.tokenizer
    image_pad, pad = tok.convert_tokens_to_ids("<|image_pad|>"), tok.pad_token_id
    blind = row_prefixes(out, with_images=False, blind_token_id=pad,
                         placeholder_ids=trainer._cepo_placeholders)
    seeing = row_prefixes(out, with_images=True)
    for b, s in zip(blind, seeing):
        assert b.pixel_values is None and int(b.mm_token_type_ids.sum()) == 0
        assert torch.equal(b.input_ids, torch.where(s.input_ids == image_pad, pad, s.input_ids))
        assert int((b.input_ids == pad).sum()) == 16  # one pad per visual token
    out = dict(out, advantages=trainer.rec_cepo[-1].grpo_advantages)
    seeing = trainer._cepo_advantages(out, truths, verdicts, 2, 0.5)
    trainer.args.cepo_teacher_images = False
    not_seeing = trainer._cepo_advantages(out, truths, verdicts, 2, 0.5)
    assert not torch.equal(seeing, not_seeing)
    # each prompt encoded once (the default) vs every row whole: the same Â, blind and seeing
    trainer.args.cepo_prefix_sharing = "false"
    torch.testing.assert_close(trainer._cepo_advantages(out, truths, verdicts, 2, 0.5),
                               not_seeing, atol=2e-5, rtol=1e-4)
    trainer.args.cepo_teacher_images = True
    torch.testing.assert_close(trainer._cepo_advantages(out, truths, verdicts, 2, 0.5), seeing,
                               atol=2e-5, rtol=1e-4)


def test_groups_without_a_boxed_wrong_answer_are_warned_once(caplog):
    """A rejected completion without \\boxed{} cannot be r-: the fallback is announced once."""
    from types import SimpleNamespace

    from cepo.integrations.trl.trainer import _Verdicts
    from cepo.negatives import select_wrong_answers

    verdicts = _Verdicts(answers=["3", None, "3", "5", None, None],
                         accuracy=[1.0, 0.0, 1.0, 0.0, 1.0, 1.0], rewards=[1, 0, 1, 0, 1, 1])
    by_group = [select_wrong_answers(verdicts.answers[j: j + 2], verdicts.rewards[j: j + 2],
                                     verdicts.accuracy[j: j + 2]) for j in (0, 2, 4)]
    assert by_group == [[], ["5"], []]  # group 0: rejected but unboxed; group 2: all correct
    me = SimpleNamespace(args=SimpleNamespace(cepo_neg_fallback="student"),
                         _cepo_warned_no_neg=False)
    with caplog.at_level("WARNING", logger="cepo.integrations.trl.trainer"):
        CEPOGRPOTrainer._cepo_warn_no_neg(me, verdicts, by_group, 2)
        CEPOGRPOTrainer._cepo_warn_no_neg(me, verdicts, by_group, 2)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "1 of 3 groups" in warned[0] and "falls back to student" in \
        warned[0] and "\\boxed{}" in warned[0]
    me = SimpleNamespace(args=me.args, _cepo_warned_no_neg=False)
    caplog.clear()
    CEPOGRPOTrainer._cepo_warn_no_neg(me, verdicts, [["7"], ["5"], []], 2)
    assert not caplog.records  # every group with a rejected rollout has its r-
