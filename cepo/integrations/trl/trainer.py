"""CEPO for TRL: `CEPOGRPOTrainer`, a `trl.GRPOTrainer` that hands TRL per-token advantages Â.

Switching from GRPO takes two lines::

    from cepo.integrations.trl import CEPOConfig, CEPOGRPOTrainer
    trainer = CEPOGRPOTrainer(model, reward_funcs=..., args=CEPOConfig(...), train_dataset=ds)

After TRL has generated and scored a generation batch (`_generate_and_score_completions`), the
trainer, for every group of ``num_generations`` rollouts (gathered across processes when a group
spans them):

1. grades each completion's last ``\\boxed{}`` against the dataset's answer column with
   `cepo.grading.Grader`, independently of the user's reward functions
   (docs/METHOD.md, "Teachers": rejected = accuracy 0); r- is the wrong answer of the
   lowest-reward rejected rollout (TRL's weighted reward sum), or the group's most frequent one;
2. builds the teacher rows ``prompt + hint(r±) + completion`` (`cepo.integrations.trl.teachers`);
3. runs the backbone for the student and the teachers (no grad, eval mode) and hands the hidden
   states to the scoring core the native trainer uses (`cepo.scoring.evidence`, r− stand-in
   `cepo.scoring.neg_stand_in`), which returns Â per token (docs/METHOD.md, "Advantages");
4. replaces TRL's ``advantages`` [B] with Â [B, T]. TRL's `_compute_loss` takes (B, T)
   advantages as they are, so every loss type, vLLM, PEFT and logging keep working.

λ follows docs/METHOD.md, "Schedules" (`cepo.schedule.lam_at`, as the native trainer) with one
step = one generation batch, derived from ``state.global_step`` (`config.generation_index`), so it
survives checkpoint/resume. While λ = 0 (after ``cepo_lambda_warmup_steps`` generations, or λ0 = 0)
nothing extra runs: TRL's GRPO advantages pass through. Evaluation batches keep GRPO advantages
(CEPO shapes training credit only).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from dataclasses import dataclass

import torch
import trl
from accelerate.utils import gather, gather_object
from packaging.version import Version
from PIL import Image
from transformers import AutoConfig
from trl import GRPOTrainer

from cepo.batch import IGNORE_INDEX, collate, response_labels, response_width
from cepo.contexts import hint_ids
from cepo.data import fit_pixels
from cepo.diagnostics import diagnostic_sums, diagnostics_from_sums
from cepo.grading import Grader, extract_boxed
from cepo.models import OutputHead, load_processor, output_head, torchvision_available
from cepo.negatives import select_wrong_answers
from cepo.prefix import use_prefix_sharing
from cepo.schedule import lam_at
from cepo.scoring import evidence, neg_stand_in, stand_in_is_student

from . import teachers as shared_teachers
from .config import CEPOConfig, generation_index
from .teachers import (
    answer_text,
    backbone_hidden,
    check_vision_keys,
    completion_text,
    row_prefixes,
)

__all__ = ["CEPOBatch", "CEPOConfig", "CEPOGRPOTrainer"]

logger = logging.getLogger(__name__)
MIN_TRL = Version("1.16.0")


@dataclass
class CEPOBatch:
    """What the last training generation batch did (this process's rows), kept for inspection."""

    generation: int  # k, the docs/METHOD.md, "Schedules" step
    lam: float  # λ_k
    grpo_advantages: torch.Tensor  # [B] TRL's advantages
    advantages: torch.Tensor  # [B, T] Â handed to TRL's loss (0 at padding)
    mask: torch.Tensor  # [B, T] bool: the tokens TRL's loss counts
    delta: torch.Tensor  # [B, T] Δ = lp+ − lp- (0 where not scored)
    scored: torch.Tensor  # [B] bool: rows whose teachers ran (A ≠ 0 and an answer exists)
    wrong_answers: list[list[str]]  # per row: the r- answers of its group ([] = fallback)
    completion_ids: torch.Tensor  # [B, T]
    prompt_ids: torch.Tensor  # [B, P]


@dataclass
class _Verdicts:
    """Correctness of every rollout of the generation batch, gathered over processes."""

    answers: list[str | None]  # [N] extracted \boxed{} answers
    accuracy: list[float]  # [N] 1.0 graded correct, 0.0 rejected
    rewards: list[float]  # [N] TRL's weighted reward sum


def fit_input_images(inputs: list[dict], min_pixels: int | None, max_pixels: int | None
                     ) -> list[dict]:
    """TRL generation inputs with every image resized as the reference does (`fit_pixels`):
    the ``images`` / ``image`` columns and image parts of conversational prompts. New dicts and
    lists; the dataset's own examples are left untouched."""
    if min_pixels is None and max_pixels is None:
        return inputs

    def fit(image):
        return fit_pixels(image, min_pixels, max_pixels) if isinstance(image, Image.Image) \
            else image

    def fit_prompt(prompt):
        if not isinstance(prompt, list):
            return prompt
        return [{**m, "content": [{**p, "image": fit(p["image"])}
                                  if isinstance(p, dict) and "image" in p else p
                                  for p in m["content"]]}
                if isinstance(m, dict) and isinstance(m.get("content"), list) else m
                for m in prompt]

    out = []
    for example in inputs:
        example = dict(example)
        if isinstance(example.get("images"), list):
            example["images"] = [fit(image) for image in example["images"]]
        if example.get("image") is not None:
            example["image"] = fit(example["image"])
        if "prompt" in example:
            example["prompt"] = fit_prompt(example["prompt"])
        out.append(example)
    return out


class CEPOGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with CEPO per-token advantages. Arguments are GRPOTrainer's; ``args``
    must be a `CEPOConfig` and the train dataset needs the column ``args.cepo_answer_column``."""

    # TRL 1.16 loss types whose `_compute_loss` broadcasts (B, T) advantages element-wise.
    PER_TOKEN_LOSS_TYPES = frozenset({"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo",
                                      "vespo"})

    def __init__(self, *args, **kwargs):
        # peft and TRL read a transformers property renamed in 5.x (is_gradient_checkpointing):
        # a FutureWarning per load and step that the user can do nothing about
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs)
        params = bound.arguments
        config = params.get("args")
        if config is None:
            model = params["model"]
            name = model if isinstance(model, str) else model.config._name_or_path
            config = params["args"] = CEPOConfig(f"{str(name).split('/')[-1]}-CEPO")
        _check_before_init(config, params)
        if params.get("processing_class") is None and not torchvision_available():
            params["processing_class"] = _image_only_processor(params["model"], config)
        super().__init__(*bound.args[1:], **bound.kwargs)
        self._check_after_init()
        self._cepo_grader = Grader(timeout_s=config.cepo_grader_timeout_s)
        self._cepo_verdicts: _Verdicts | None = None
        self.cepo_last: CEPOBatch | None = None

    # ------------------------------------------------------------------ construction checks

    def _check_after_init(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        text_config = model.config.get_text_config()
        if getattr(text_config, "final_logit_softcapping", None) is not None:
            raise NotImplementedError("final_logit_softcapping is not supported by the CEPO "
                                      "kernels")
        for attr in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
            if getattr(text_config, attr, None) not in (None, 1, 1.0):
                raise NotImplementedError(f"models that scale their logits ({attr}) are not "
                                          "supported by the CEPO kernels")
        output_head(model)  # raises for a LoRA-adapted lm_head (no single weight to score with)
        if self.args.cepo_teacher_model == "base" and not hasattr(model, "disable_adapter"):
            raise ValueError("cepo_teacher_model='base' needs a PEFT model (adapters to disable); "
                             "pass peft_config or use cepo_teacher_model='actor'")
        config = model.config
        self._cepo_placeholders = [t for t in (getattr(config, "image_token_id", None),
                                               getattr(config, "video_token_id", None),
                                               getattr(config, "image_token_index", None))
                                   if t is not None]

    # ------------------------------------------------------------------ λ schedule

    def cepo_generation(self) -> int:
        """k: the 1-based index of the generation batch now being produced (a step of
        docs/METHOD.md, "Schedules")."""
        return generation_index(
            self.state.global_step, self._step,
            gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            steps_per_generation=self.args.steps_per_generation,
            num_iterations=self.num_iterations)

    def cepo_lambda(self) -> float:
        """λ of the generation batch now being produced (`cepo.schedule.lam_at`)."""
        return lam_at(self.cepo_generation(), self.args.cepo_lambda_init,
                      self.args.cepo_lambda_warmup_steps, self.args.cepo_lambda_offset)

    # ------------------------------------------------------------------ TRL hooks

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._cepo_grader.close()  # the math-verify child; restarted if graded again

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (gathered); additionally grades every completion for the r- choice."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        if self.model.training and self.cepo_lambda() > 0:
            column = self.args.cepo_answer_column
            truths = [answer_text(x.get(column)) for x in inputs]
            answers = [extract_boxed(completion_text(c)) for c in completions]
            pairs = [(a, t) for a, t in zip(answers, truths) if t is not None]
            graded = iter(self._cepo_grader.grade_many(pairs))
            accuracy = [float(next(graded)) if t is not None else 0.0 for t in truths]
            rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)
                       ).nansum(dim=1)  # [N], already gathered
            device = self.accelerator.device
            self._cepo_verdicts = _Verdicts(
                answers=gather_object(answers),
                accuracy=gather(torch.tensor(accuracy, device=device)).tolist(),
                rewards=rewards.tolist())
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        # images resized before TRL's processor sees them: generation and teachers agree
        inputs = fit_input_images(inputs, self.args.cepo_min_pixels, self.args.cepo_max_pixels)
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        k, lam = self.cepo_generation(), self.cepo_lambda()
        self._metrics["train"]["cepo/lambda"].append(lam)
        if lam == 0:
            return out
        verdicts, self._cepo_verdicts = self._cepo_verdicts, None
        if verdicts is None:
            raise RuntimeError("CEPO found no graded rollouts: _calculate_rewards was not called")
        truths = [answer_text(x.get(self.args.cepo_answer_column)) for x in inputs]
        out["advantages"] = self._cepo_advantages(out, truths, verdicts, k, lam)
        return out

    # ------------------------------------------------------------------ Â

    def _cepo_advantages(self, out: dict, truths: list, verdicts: _Verdicts, k: int,
                         lam: float) -> torch.Tensor:
        args = self.args
        check_vision_keys(out, args.cepo_teacher_images)
        comp_ids = out["completion_ids"]  # [B, T]
        loss_mask = out["completion_mask"].bool()  # [B, T]
        if out.get("tool_mask") is not None:
            loss_mask = loss_mask & out["tool_mask"].bool()
        grpo = out["advantages"].float()  # [B]
        b, width = comp_ids.shape
        g, offset = self.num_generations, self.accelerator.process_index * b

        # r- per group, from the gathered verdicts (every process picks for every group alike)
        wrong_by_group = [
            select_wrong_answers(verdicts.answers[j: j + g], verdicts.rewards[j: j + g],
                                 verdicts.accuracy[j: j + g], choice=args.cepo_neg_choice,
                                 k=args.cepo_num_neg)
            for j in range(0, len(verdicts.answers), g)]
        wrong = [wrong_by_group[(offset + i) // g] for i in range(b)]
        self._cepo_warn_no_neg(verdicts, wrong_by_group, g)
        student = row_prefixes(out, with_images=True)
        teacher = student if args.cepo_teacher_images else row_prefixes(
            out, with_images=False, blind_token_id=self._tokenizer.pad_token_id,
            placeholder_ids=self._cepo_placeholders)

        advantages = grpo[:, None] * loss_mask  # [B, T] Â = A where no teacher runs
        delta = torch.zeros(b, width, device=comp_ids.device)
        token_weight = torch.ones(b, width, device=comp_ids.device)
        scored = torch.tensor([bool(grpo[i] != 0) and truths[i] is not None for i in range(b)])
        uniform = self._cepo_uniform()
        active = list(range(b)) if uniform else scored.nonzero().flatten().tolist()
        batch_size = args.per_device_train_batch_size
        for start in range(0, len(active), batch_size):
            rows = active[start: start + batch_size]
            t = response_width(out["completion_mask"], rows)  # drop shared padding
            labels = response_labels(comp_ids, loss_mask, rows, t)
            ev = self._cepo_score(out, student, teacher, rows, t, labels, grpo[rows], truths,
                                  wrong, lam, uniform, validate=start == 0)
            keep = scored[rows].to(comp_ids.device)[:, None]  # unscored rows keep Â = A
            advantages[rows, :t] = torch.where(keep, ev.advantages.to(advantages.dtype),
                                               advantages[rows, :t])
            counted = keep & (labels != IGNORE_INDEX)
            delta[rows, :t] = torch.where(counted, ev.delta.float(), 0.0)
            token_weight[rows, :t] = torch.where(counted, ev.token_weight.float(), 1.0)

        self._cepo_log(grpo, delta, token_weight, loss_mask, scored, wrong_by_group, k)
        self.cepo_last = CEPOBatch(k, lam, grpo.detach().cpu(), advantages.detach().cpu(),
                                   loss_mask.cpu(), delta.cpu(), scored, wrong, comp_ids.cpu(),
                                   out["prompt_ids"].cpu())
        return advantages

    def _cepo_uniform(self) -> bool:
        """With several processes every rank runs the same forwards (FSDP / ZeRO-3 forwards are
        collectives): all rows, all streams. Alone, rows with A = 0 (Â = 0) are skipped."""
        return self.accelerator.num_processes > 1

    @torch.no_grad()
    def _cepo_score(self, out, student, teacher, rows, t, labels, adv, truths, wrong, lam,
                    uniform, *, validate):
        """Student and teacher hidden states for ``rows`` → the scoring core (`evidence`)."""
        args = self.args
        model = self.accelerator.unwrap_model(self.model)
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = hf_model.base_model
        tokenizer, pad = self._tokenizer, self._tokenizer.pad_token_id
        resp_ids, resp_mask = out["completion_ids"][rows, :t], out["completion_mask"][rows, :t]
        device = resp_ids.device

        def hinted(row, answer):  # the teacher row with the hint (none when no answer exists)
            base = teacher[row]
            return base if answer is None else base.extend(
                hint_ids(tokenizer, args.cepo_hint_template, answer))

        share = (not self._cepo_uniform() and shared_teachers.right_padded(resp_mask)  # 1 process
                 and use_prefix_sharing(args.cepo_prefix_sharing, model))

        def hidden(prefixes, sub, teacher_pass):
            ctx = model.disable_adapter() if teacher_pass and args.cepo_teacher_model == "base" \
                else contextlib.nullcontext()
            with ctx, self.accelerator.autocast():
                if share:
                    bases = [(teacher if teacher_pass else student)[rows[j]] for j in sub]
                    return shared_teachers.shared_rows_hidden(model, bases, prefixes,
                                                              resp_ids[sub], resp_mask[sub])
                batch = collate(prefixes, pad, resp_ids[sub], resp_mask[sub]).to(device)
                return backbone_hidden(backbone, batch, t, is_vlm=self._is_vlm)

        everyone = list(range(len(rows)))
        cepo = args.cepo_algo == "cepo"
        has_neg = [cepo and bool(wrong[r]) for r in rows]
        run_neg = everyone if uniform and cepo else [j for j in everyone if has_neg[j]]
        need_student = uniform or (not all(has_neg) and stand_in_is_student(
            algo=args.cepo_algo, neg_fallback=args.cepo_neg_fallback))  # r- stand-in
        was_training = model.training
        model.eval()  # teachers score in eval mode (docs/METHOD.md, "Teachers"); dropout off
        try:
            pos_h = hidden([hinted(r, truths[r]) for r in rows], everyone, True)
            policy_h = hidden([student[r] for r in rows], everyone, False) if need_student \
                else pos_h  # its log-probs are then unused
            stand_in = neg_stand_in(policy_h, pos_h, algo=args.cepo_algo,
                                    neg_fallback=args.cepo_neg_fallback)
            negs = []
            for kk in range(args.cepo_num_neg):
                neg = stand_in.clone()
                if run_neg:
                    answers = [wrong[rows[j]][kk % len(wrong[rows[j]])] if has_neg[j]
                               else truths[rows[j]] for j in run_neg]  # placeholders: uniform
                    h = hidden([hinted(rows[j], a) for j, a in zip(run_neg, answers)], run_neg,
                               True)
                    take = [i for i, j in enumerate(run_neg) if has_neg[j]]
                    neg[[run_neg[i] for i in take]] = h[take]
                negs.append(neg)
        finally:
            model.train(was_training)
        neg_h = negs[0] if len(negs) == 1 else torch.stack(negs)  # [b, t, D] or [K, b, t, D]
        weight, bias = output_head(model)
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight  # FSDP2
        with _gather_head(weight, bias):
            return evidence(policy_h, pos_h, neg_h, OutputHead(weight, bias), labels, adv,
                            mask=labels != IGNORE_INDEX, lam=lam, eps_w=args.cepo_eps_w,
                            temperature=self.temperature, backend=args.cepo_backend,
                            validate=validate)

    _cepo_warned_no_neg = False

    def _cepo_warn_no_neg(self, verdicts: _Verdicts, wrong_by_group: list, g: int) -> None:
        """Once per trainer: groups with rejected rollouts but no r- (no rejected completion
        holds a \\boxed{} answer), so T- falls back for all of them."""
        rejected = [any(a == 0 for a in verdicts.accuracy[j: j + g])
                    for j in range(0, len(verdicts.accuracy), g)]
        lacking = sum(r and not w for r, w in zip(rejected, wrong_by_group))
        if lacking == 0 or self._cepo_warned_no_neg:
            return
        self._cepo_warned_no_neg = True
        logger.warning(
            "CEPO: %d of %d groups have rejected completions but none with a \\boxed{} answer, "
            "so they have no wrong answer r- to show the T- teacher; T- falls back to %s for "
            "them (cepo_neg_fallback). r- is the last \\boxed{...} of a rejected completion: "
            "prompt the model to box its final answer (see cepo/frac_groups_with_neg). "
            "Warned once.", lacking, len(rejected), self.args.cepo_neg_fallback)

    # the metrics TRL logs every training generation batch (NaN when a side has no token)
    LOGGED = ("delta_mean", "delta_std", "delta_mean_pos", "delta_mean_neg", "frac_wrong_dir_pos",
              "frac_wrong_dir_neg", "weight_clip_frac", "weight_mean")

    def _cepo_log(self, grpo, delta, token_weight, loss_mask, scored, wrong_by_group, k) -> None:
        """The scoring core's diagnostics (`cepo.diagnostics`) over all processes' tokens."""
        valid = loss_mask & scored.to(loss_mask.device)[:, None]  # [B, T]
        sums = diagnostic_sums(delta, grpo, valid, token_weight, eps_w=self.args.cepo_eps_w)
        stats = diagnostics_from_sums(gather(sums[None]).sum(0).tolist())
        metrics = self._metrics["train"]
        metrics["cepo/generation"].append(float(k))
        for name in self.LOGGED:
            metrics[f"cepo/{name}"].append(stats.get(f"cepo/{name}", float("nan")))
        with_neg = sum(bool(w) for w in wrong_by_group)
        metrics["cepo/frac_groups_with_neg"].append(
            with_neg / len(wrong_by_group) if wrong_by_group else float("nan"))


# ---------------------------------------------------------------------- helpers


def _check_before_init(config, params: dict) -> None:
    """Refuse what cannot work, before any model is loaded."""
    if Version(trl.__version__) < MIN_TRL:
        raise ImportError(f"CEPOGRPOTrainer needs trl >= {MIN_TRL} (per-token advantages in "
                          f"_compute_loss); found {trl.__version__}")
    if not isinstance(config, CEPOConfig):
        raise TypeError(f"CEPOGRPOTrainer needs args=CEPOConfig(...), got "
                        f"{type(config).__name__}; CEPOConfig takes every GRPOConfig field")
    if config.loss_type not in CEPOGRPOTrainer.PER_TOKEN_LOSS_TYPES:
        raise ValueError(f"loss_type={config.loss_type!r} is not known to accept per-token "
                         f"advantages; use one of {sorted(CEPOGRPOTrainer.PER_TOKEN_LOSS_TYPES)}")
    if config.remove_unused_columns:
        raise ValueError(f"remove_unused_columns=True would drop the answer column "
                         f"{config.cepo_answer_column!r} CEPO needs; set it to False")
    for name in ("tools", "environment_factory"):
        if params.get(name):
            raise NotImplementedError(f"CEPOGRPOTrainer does not support {name} yet: tool and "
                                      "environment turns inside a completion have no teacher "
                                      "context")
    dataset = params.get("train_dataset")
    columns = getattr(dataset, "column_names", None)
    if dataset is not None and columns is not None and config.cepo_answer_column not in columns:
        raise ValueError(f"the train dataset has no answer column {config.cepo_answer_column!r} "
                         f"(columns: {list(columns)}); CEPO builds the r+ teacher from it. Set "
                         "CEPOConfig(cepo_answer_column=...) to the ground-truth column")


def _image_only_processor(model, config: CEPOConfig):
    """TRL's default Qwen3-VL processor needs torchvision (video): without it, cepo's image-only
    one (images work as usual, videos do not). None, i.e. TRL's default, for other models."""
    name = model if isinstance(model, str) else model.config._name_or_path
    model_config = AutoConfig.from_pretrained(name, trust_remote_code=config.trust_remote_code) \
        if isinstance(model, str) else model.config
    return load_processor(name) if model_config.model_type == "qwen3_vl" else None


def _gather_head(weight, bias):
    """ZeRO-3: gather the partitioned lm_head for a direct read (TRL's helper; no-op otherwise)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # pragma: no cover - older layouts
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(weight, bias)
