"""The policy update of one training step: PPO over mini-batches with the fused log-prob kernel.

    for each epoch, for each mini-batch (an optimizer step):
        for each micro-batch of rollouts (gradient accumulation):
            hidden = the model's response hidden states              [b, t, D], with grad
            loss   = CEPOLoss(hidden, lm_head weight, Â, old log-probs)
                     (docs/METHOD.md, "Loss", no logits)
            backward
        clip the global grad norm, AdamW step (skipped if the loss or norm is NaN/inf)

Token mean, exactly: the loss of docs/METHOD.md, "Loss" is the mean of ℓ_t over every valid token of
the mini-batch, on all processes together. Each micro-batch therefore divides its token sum by the
mini-batch's global token count (all-reduced before the first micro-batch), times the number of
processes because DDP averages gradients over them. The same holds for the other aggregations with
sequence counts. Micro-batch sizes and the split across processes then change nothing but rounding.

With prefix sharing (`cepo.prefix`), each mini-batch's rows are ordered by prompt before it is cut
into micro-batches, so a micro-batch holds whole groups where it can; each prompt in a micro-batch
is encoded once with gradients and its keys/values serve all its rows (a group split across
micro-batches is encoded once per part). The mini-batch, its counts and its loss are unchanged.

The loss is computed inside `PolicyLoss.forward`, so DDP and FSDP (`cepo.sharding`, which gathers
the lm_head weight in the root's forward) wrap one module whose forward is the whole loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict

import torch

from cepo.batch import IGNORE_INDEX, ModelInputs, response_labels, response_width
from cepo.config import PPOConfig
from cepo.experience import Experience
from cepo.models import output_head, response_hidden
from cepo.prefix import grouped_response_hidden, use_prefix_sharing
from cepo_kernels import CEPOLoss
from cepo_kernels.loss import PPOLossOutput


class NonFiniteError(RuntimeError):
    """Training diverged: too many non-finite optimizer steps in a row, or NaN/inf weights."""


class NonFiniteGuard:
    """Skips an optimizer step whose loss or global grad norm is NaN/inf (its gradients are
    dropped) and raises `NonFiniteError` after `limit` such steps in a row. The trainer saves a
    checkpoint only while `in_a_row` is 0, so a resumed run starts counting where the
    uninterrupted one stood."""

    def __init__(self, limit: int, in_a_row: int = 0):
        self.limit = limit
        self.in_a_row = in_a_row

    def allows(self, loss: float, norm: float, accelerator) -> bool:
        """True: take the step. Every process decides alike (a flag reduced over processes)."""
        bad = not (math.isfinite(loss) and math.isfinite(norm))
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(bad)], device=accelerator.device)
            bad = bool(accelerator.reduce(flag, reduction="max").item())
        if not bad:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                f"norm (last: loss {loss}, grad norm {norm}); stopping. The last checkpoint is "
                "intact: lower --optim.lr (or check the data) and --resume, or raise "
                "--optim.max_nonfinite_steps")
        return False


class PolicyLoss(torch.nn.Module):
    """The actor plus the CEPO loss: ``forward(inputs, labels, old, adv, mask)`` -> loss.

    `prefix_sharing` (auto, true, false) decides, once, whether `ppo_update` passes
    ``shared=(prompts, group, response_ids, response_mask)`` instead of whole rows
    (`share_prefix`); `sharded`: the loss will be sharded with FSDP."""

    def __init__(self, model: torch.nn.Module, ppo: PPOConfig, *, temperature: float = 1.0,
                 backend: str = "auto", prefix_sharing: str = "auto", sharded: bool = False):
        super().__init__()
        self.model = model
        self.share_prefix = use_prefix_sharing(prefix_sharing, model, grad=True, sharded=sharded)
        self.loss = CEPOLoss(
            clip_low=ppo.clip_low,
            clip_high=ppo.clip_high,
            clip_dual=ppo.clip_dual,
            aggregation=ppo.aggregation,
            temperature=temperature,
            ignore_index=IGNORE_INDEX,
            backend=backend,
            validate=False,  # labels come from our own rollouts: no host syncs in the hot path
        )

    def forward(
        self,
        inputs: ModelInputs | None = None,
        labels: torch.Tensor | None = None,  # [b, t] response ids, IGNORE_INDEX on padding
        old_logprobs: torch.Tensor | None = None,  # [b, t] log π_old
        advantages: torch.Tensor | None = None,  # [b, t] Â
        mask: torch.Tensor | None = None,  # [b, t] bool
        normalizer: float | None = None,
        shared: tuple | None = None,  # (prompts, group [b], response_ids, response_mask [b, t])
    ) -> PPOLossOutput | None:
        if inputs is None and shared is None:  # a no-op call: lets FSDP find its root
            return None
        if shared is not None:  # each prompt encoded once, its keys/values shared by its rows
            hidden = grouped_response_hidden(self.model, *shared)  # [b, t, D]
        else:
            hidden = response_hidden(self.model, inputs, labels.shape[1])  # [b, t, D]
        weight, bias = output_head(self.model)
        return self.loss(hidden, weight, labels, old_logprobs, advantages, mask, bias,
                         normalizer=normalizer)


def ppo_update(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    experience: Experience,
    ppo: PPOConfig,
    *,
    grad_clip: float,
    accelerator,
    generator: torch.Generator | None = None,
    guard: NonFiniteGuard | None = None,
) -> dict[str, float]:
    """All optimizer steps of one rollout batch; returns the update's metrics (this process).

    `policy` is the (possibly DDP-wrapped) `PolicyLoss`. `generator` seeds the mini-batch shuffle
    (``ppo.shuffle``), so a resumed run shuffles exactly like an uninterrupted one. `guard`
    (default: a fresh one, limit 3) skips non-finite steps (``update/skipped_nonfinite``).
    """
    guard = guard if guard is not None else NonFiniteGuard(limit=3)
    skipped = 0
    clock = time.perf_counter()
    rollouts = experience.rollouts
    device = accelerator.device
    world = accelerator.num_processes
    n = rollouts.num_rollouts
    mask_all = rollouts.response_mask.bool()  # [N, T]
    labels_all = response_labels(rollouts.response_ids, mask_all)
    params = [p for p in policy.parameters() if p.requires_grad]
    sums: dict[str, float] = defaultdict(float)
    extremes: dict[str, list[float]] = defaultdict(list)
    grad_norms, losses, tokens_seen = [], [], 0.0
    n_mini = min(ppo.mini_batches, n)
    share = getattr(policy, "module", policy).share_prefix  # DDP keeps the loss in .module
    group_size = rollouts.group_size
    prompts = [p.prefix() for p in rollouts.prompts] if share else []
    for _ in range(ppo.epochs):
        order = torch.randperm(n, generator=generator) if ppo.shuffle else torch.arange(n)
        for mini in order.tensor_split(n_mini):
            rows = mini.tolist()
            if share:  # a prompt's rows side by side: micro-batches then hold whole groups
                rows.sort(key=lambda r: r // group_size)  # stable: shuffled order within
            # global counts of this mini-batch: valid tokens and non-empty sequences
            local = torch.tensor(
                [float(mask_all[rows].sum()), float((mask_all[rows].sum(1) > 0).sum()),
                 float(len(rows))], dtype=torch.float64, device=device)
            total = accelerator.reduce(local, reduction="sum") if world > 1 else local
            micro = [rows[i : i + ppo.micro_batch_size]
                     for i in range(0, len(rows), ppo.micro_batch_size)]
            n_micro = len(micro)
            if world > 1:  # every process must run as many backward passes (DDP)
                count = torch.tensor([n_micro], device=device)
                n_micro = int(accelerator.reduce(count, reduction="max").item())
            loss_sum = 0.0
            for i in range(n_micro):
                real = i < len(micro)
                sub = micro[i] if real else micro[-1]  # padding pass: zero loss, same graph
                t = response_width(mask_all, sub)  # drop shared padding columns
                mask = mask_all[sub, :t].to(device)
                scale = _scale(ppo.aggregation, mask, total, world) if real else 0.0
                sync = i == n_micro - 1
                ctx = contextlib.nullcontext() if sync else accelerator.no_sync(policy)
                if share:
                    inputs = None
                    shared = (prompts, [r // group_size for r in sub],
                              rollouts.response_ids[sub, :t].to(device), mask)
                else:
                    inputs, shared = rollouts.student_inputs(sub, width=t).to(device), None
                with ctx:
                    out = policy(
                        inputs,
                        labels_all[sub, :t].to(device),
                        experience.old_logprobs[sub, :t].to(device),
                        experience.token_advantages[sub, :t].to(device),
                        mask,
                        normalizer=_normalizer(ppo.aggregation, total, world, rollouts),
                        shared=shared,
                    )
                    accelerator.backward(out.loss * scale)
                if real:
                    loss_sum += out.loss.item() * scale
                    _accumulate(out.metrics, sums, extremes)
                    tokens_seen += float(out.metrics["num_tokens"])
            if grad_clip > 0:
                norm = accelerator.clip_grad_norm_(params, grad_clip)
            else:
                norms = [_full(p.grad.norm()) for p in params if p.grad is not None]
                norm = torch.norm(torch.stack(norms)) if norms else torch.zeros(())
            grad_norms.append(float(_full(norm)))
            losses.append(loss_sum)
            try:
                step = guard.allows(loss_sum, grad_norms[-1], accelerator)
            except NonFiniteError:
                optimizer.zero_grad(set_to_none=True)  # no NaN gradients left behind
                raise
            if step:
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
    weight = max(tokens_seen, 1.0)
    metrics = {f"ppo/{k}": v / weight for k, v in sums.items()}
    metrics.update({f"ppo/{k}": (max(v) if k.endswith("max") else min(v))
                    for k, v in extremes.items()})
    metrics["ppo/loss"] = sum(losses) / len(losses)
    metrics["ppo/grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["ppo/grad_norm_max"] = max(grad_norms)
    metrics["ppo/optimizer_steps"] = float(len(grad_norms) - skipped)
    metrics["update/skipped_nonfinite"] = float(skipped)
    metrics["time/update"] = time.perf_counter() - clock
    metrics["tokens/update"] = tokens_seen
    return metrics


def _normalizer(aggregation: str, total: torch.Tensor, world: int, rollouts) -> float | None:
    """The `ppo_clip_loss` normalizer: global token count / processes for token-mean, the
    constant horizon (max response length) for Dr. GRPO's token-sum-norm."""
    if aggregation == "token-mean":
        return max(float(total[0]), 1.0) / world
    if aggregation == "seq-mean-token-sum-norm":
        return float(rollouts.response_ids.shape[1])
    return None


def _scale(aggregation: str, mask: torch.Tensor, total: torch.Tensor, world: int) -> float:
    """Factor turning a micro-batch's own mean into its share of the global mini-batch mean."""
    if aggregation == "token-mean":
        return 1.0  # the normalizer already divides by the global count
    if aggregation == "seq-mean-token-mean":  # loss = Σ_seq mean / (non-empty seqs here)
        return float((mask.sum(1) > 0).sum()) * world / max(float(total[1]), 1.0)
    return float(mask.shape[0]) * world / max(float(total[2]), 1.0)  # Σℓ / (b · horizon)


def _accumulate(metrics: dict, sums: dict, extremes: dict) -> None:
    """Token-weighted sums of the loss's mean metrics; running max/min of its extremes."""
    count = float(metrics["num_tokens"])
    for key, value in metrics.items():
        if key == "num_tokens":
            continue
        if key.endswith(("_max", "_min")):
            if count > 0:
                extremes[key].append(float(value))
        else:
            sums[key] += float(value) * count


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value made whole; other tensors unchanged."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def check_replicas(model: torch.nn.Module, accelerator) -> None:
    """Raise if the trainable weights differ between processes (a broken gradient sync).

    Cheap (two numbers per process), run before every checkpoint of a multi-process run.
    Sharded (FSDP) weights have one copy only, so there is nothing to compare.
    """
    if accelerator.num_processes == 1:
        return
    params = [p.detach().double() for p in model.parameters()
              if p.requires_grad and not hasattr(p, "full_tensor")]
    if not params:
        return
    local = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)])
    gathered = accelerator.gather(local.to(accelerator.device)[None]).view(-1, 2).cpu()
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-9, atol=0):
        raise RuntimeError(f"trainable weights differ between processes: {gathered.tolist()}")
