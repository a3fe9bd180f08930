"""``trainer.v1.trainer_mode=cepo``: verl's synchronous PPO trainer whose advantage step, on the
driver, turns the group advantage into CEPO's Â (docs/METHOD.md, "Advantages").

The step runs after verl's own advantage computation (``algorithm.adv_estimator=cepo``, the
project's GRPO A) and before the actor update:

1. read prompts, responses, masks, group ids, scores, ground truths, the grader's verdicts, the
   old log-probs, positions and multimodal inputs of the batch from TransferQueue; decode the
   responses and extract their final answers with the project's `extract_boxed`;
2. choose r- and lay out the T+ and T- rows (`step.plan_teachers`; a vision row keeps its images
   and its prompt's M-RoPE positions, `step.teacher_position_ids`), put them in a partition of
   their own and score them all in ONE ``actor_rollout_wg.compute_log_prob`` call (the actor's
   current weights; ``teacher_model=base`` adds ``no_lora_adapter``);
3. reweight with `cepo_kernels.cepo_advantages` (`step.reweight`), λ from ``global_steps`` (so a
   resumed run continues the schedule), write Â back and log ``cepo/*`` through verl's metrics.
"""

from __future__ import annotations

import logging

import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.tokenizer.tokenizer import get_processor_token_id
from verl.utils.transferqueue_utils import tq
from verl.workers.utils.padding import response_from_nested, response_to_nested

from cepo.errors import ConfigError
from cepo.grading import extract_boxed

from .estimator import NAME as ESTIMATOR
from .options import VerlCEPOOptions, options_from_config
from .step import Rows, plan_teachers, reweight, teacher_fields

logger = logging.getLogger(__name__)

MODE = "cepo"
GROUP_ESTIMATORS = (ESTIMATOR, "grpo")  # a sequence-level group A for CEPO to reweight


def check_config(config) -> VerlCEPOOptions:
    """The ``cepo:`` options, after checking the estimator and the base teacher's adapters:
    before any worker starts."""
    options = options_from_config(config.get("cepo"))
    estimator = str(config.algorithm.adv_estimator)
    if estimator not in GROUP_ESTIMATORS:
        raise ConfigError(f"trainer.v1.trainer_mode=cepo reweights a group advantage: set "
                          f"algorithm.adv_estimator=cepo (got {estimator!r})")
    model = config.actor_rollout_ref.model
    if options.teacher.teacher_model == "base" and not (
            model.get("lora_rank", 0) or model.get("lora_adapter_path", None)):
        raise ConfigError("cepo.teacher_model=base scores the teachers with the LoRA adapters "
                          "off, so it needs a LoRA actor (actor_rollout_ref.model.lora_rank > 0)")
    return options


@register_trainer(MODE)
class CEPOTrainer(PPOTrainerSync):
    """`PPOTrainerSync` plus the CEPO advantage step."""

    def __init__(self, config):
        self.cepo_options = check_config(config)
        super().__init__(config)

    # verl branches on ``trainer_mode == "sync"`` (replay buffer, refill, checkpointed queue):
    # CEPO is the synchronous colocated loop, so every such branch must see "sync".
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        if value != MODE:
            raise ValueError(f"CEPOTrainer runs as trainer.v1.trainer_mode={MODE}, got {value!r}")

    def cepo_lambda(self) -> float:
        return self.cepo_options.lam(self.global_steps)

    def _compute_advantage(self, batch, metrics: dict):
        batch = super()._compute_advantage(batch, metrics=metrics)
        return cepo_advantage_step(self, batch, metrics)


def cepo_advantage_step(trainer, batch, metrics: dict):
    """Replace the batch's advantages in TransferQueue by Â; ``trainer`` needs ``cepo_options``,
    ``global_steps``, ``tokenizer``, ``config`` and ``actor_rollout_wg``."""
    options: VerlCEPOOptions = trainer.cepo_options
    lam = options.lam(trainer.global_steps)
    metrics["cepo/lambda"] = lam
    if lam == 0 or len(batch.keys) == 0:
        return batch
    rows = read_rows(batch, options, trainer.tokenizer)
    plan = plan_teachers(rows, options, trainer.tokenizer, _placeholder_ids(trainer))
    logprobs = score_teachers(trainer, batch, plan, options) if plan.rows else []
    result = reweight(rows, plan, logprobs, options, lam)
    mask = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                           select_fields=["response_mask"])["response_mask"]
    fields = TensorDict({"advantages": response_to_nested(result.advantages, mask)},
                        batch_size=len(batch.keys))
    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
    metrics.update(result.metrics)
    trainer.cepo_last, trainer.cepo_last_plan = result, plan
    return batch


READ_FIELDS = ("uid", "prompts", "responses", "response_mask", "rm_scores", "advantages",
               "old_log_probs", "extra_fields", "position_ids", "multi_modal_inputs")


def read_rows(batch, options: VerlCEPOOptions, tokenizer) -> Rows:
    """The batch's rows from TransferQueue, as `step.Rows`."""
    top, *path = options.ground_truth_field.split(".")
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id,
                           select_fields=[*READ_FIELDS, top])
    responses = list(data["responses"].unbind())
    mask = data["response_mask"]
    width = max(len(r) for r in responses)

    def padded(nested) -> torch.Tensor:
        out = torch.zeros(len(responses), width)
        for i, row in enumerate(nested.unbind()):
            out[i, : len(row)] = row.float()
        return out

    scores = torch.tensor([float(r.float().sum()) for r in data["rm_scores"].unbind()])
    extra = list(data["extra_fields"])
    info = [(e or {}).get("reward_extra_info", {}) or {} for e in extra]
    accuracy = [float(inf[options.accuracy_key]) if options.accuracy_key in inf
                else float(s >= options.correct_score) for inf, s in zip(info, scores.tolist())]
    truths = [_dig(v, path) for v in data[top]]
    texts = tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
    present = set(data.keys())
    mm = [m.data if isinstance(m, NonTensorData) else m for m in data["multi_modal_inputs"]] \
        if "multi_modal_inputs" in present else None
    return Rows(
        uids=[str(u) for u in data["uid"]],
        prompts=list(data["prompts"].unbind()),
        responses=responses,
        response_mask=list(mask.unbind()),
        advantages=padded(data["advantages"]),
        student_logprobs=padded(data["old_log_probs"]),
        scores=scores,
        ground_truths=[None if t is None or not str(t).strip() else str(t) for t in truths],
        answers=[extract_boxed(t) for t in texts],
        accuracy=accuracy,
        texts=texts,
        order=[_session(k) for k in batch.keys],
        position_ids=list(data["position_ids"].unbind()) if "position_ids" in present else None,
        multi_modal_inputs=mm,
    )


def score_teachers(trainer, batch, plan, options: VerlCEPOOptions) -> list[torch.Tensor]:
    """All teacher rows through ONE ``compute_log_prob`` call; per-row [T_i] log-probs."""
    from transfer_queue import KVBatchMeta

    fields = teacher_fields(plan)
    n = len(plan.rows)
    keys = [f"{batch.keys[r.source]}|cepo|{r.kind}" for r in plan.rows]
    pad = (-n) % _row_multiple(trainer)  # rows split evenly over ranks and micro-batches
    keys += [f"{keys[-1]}|pad{j}" for j in range(pad)]
    fields = {k: v + [v[-1]] * pad for k, v in fields.items()}
    tags = [{"status": "success", "prompt_len": len(p), "response_len": len(r),
             "seq_len": len(p) + len(r)}
            for p, r in zip(fields["prompts"], fields["responses"])]
    td = TensorDict({k: NonTensorStack(*v) if k == "multi_modal_inputs" else
                     torch.nested.as_nested_tensor(v, layout=torch.jagged)
                     for k, v in fields.items()}, batch_size=len(keys))
    partition = options.partition
    tq.kv_batch_put(keys=keys, partition_id=partition, fields=td, tags=tags)
    try:
        extra = {"calculate_entropy": False, "compute_loss": False,
                 "temperature": trainer.config.actor_rollout_ref.rollout.temperature}
        if options.teacher.teacher_model == "base":
            extra["no_lora_adapter"] = True
        meta = KVBatchMeta(keys=keys, tags=tags, partition_id=partition, extra_info=extra)
        output = trainer.actor_rollout_wg.compute_log_prob(meta)
        if len(output) != len(keys):
            raise RuntimeError(f"compute_log_prob returned {len(output)} rows for {len(keys)}")
        data = tq.kv_batch_get(keys=keys, partition_id=partition,
                               select_fields=["log_probs", "response_mask"])
        logprobs = response_from_nested(data["log_probs"], data["response_mask"])
    finally:
        tq.kv_clear(keys=keys, partition_id=partition)
    return list(logprobs.unbind())[:n]


def _placeholder_ids(trainer) -> list[int]:
    """Image and video placeholder token ids of the trainer's processor (none for text)."""
    processor = getattr(trainer, "processor", None)
    ids = [get_processor_token_id(processor, name) for name in ("image", "video")]
    return [i for i in ids if i is not None]


def _row_multiple(trainer) -> int:
    """The teacher batch must split evenly over the actor's data-parallel ranks and, without
    dynamic batch sizes, each rank's part into log-prob micro-batches of a fixed size."""
    multiple = _dp_size(trainer.actor_rollout_wg)
    ref = trainer.config.actor_rollout_ref
    if not ref.actor.get("use_dynamic_bsz", False):
        multiple *= int(ref.rollout.get("log_prob_micro_batch_size_per_gpu", None) or 1)
    return multiple


def _dp_size(worker_group) -> int:
    """Data-parallel size of the actor mesh, as verl's batch balancing reads it."""
    info = getattr(worker_group, "_dispatch_info", None)
    if info is None or not hasattr(worker_group, "_query_dispatch_info"):
        return 1
    if "actor" not in info:
        info["actor"] = worker_group._query_dispatch_info("actor")
    return max(info["actor"]) + 1


def _session(key: str) -> int:
    """Sampling index of a verl row key ``{uid}_{session}_{turn}`` (0 when it has none)."""
    parts = str(key).rsplit("_", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


def _dig(value, path):
    for name in path:
        value = value.get(name) if isinstance(value, dict) else None
    return value
