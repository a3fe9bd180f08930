"""An estimate (not a measurement) of one paper training step on 8 GPUs, HF `generate` vs vLLM.

``python -m bench.paper_step`` prints it. No GPU has run a paper step of cepo yet; this is a
simple analytic model, written down so that its assumptions can be checked and replaced by a
measurement (``bash bench/gpu.sh``) later. Per GPU (the paper's 32 prompts × 8 rollouts split
over 8 GPUs: 32 rollouts each, one generate call, as ``generation_batch_size`` 128 allows):

- **Rollout** = the decode steps of one batch that runs to its longest response (all
  ``RESPONSE`` tokens: an upper bound). A decode step reads the bf16 weights of the language
  model once and the KV cache of every sequence; it takes
  ``max(bytes / (HBM bandwidth × efficiency), host time per step)``. HF `generate` runs eagerly:
  every kernel of a step is launched from Python (host-bound at a small batch), and its
  dynamic cache appends by concatenation, which copies the whole cache again (KV traffic ×3:
  read for attention, read and write for the copy). vLLM replays a step as one CUDA graph from a
  paged cache (KV read once) and adds its scheduler's time per step.
- **Score and update** are the same for both engines: compute-bound passes over every token of
  the batch at ``MFU`` of the GPU's dense bf16 peak: scoring = student + 2 teachers forwards
  (3 × 2·N·T FLOPs), update = forward, gradient-checkpointing recompute and the input-gradient
  backward of LoRA (6·N·T FLOPs); T = rollouts × (prompt + response) tokens, N = parameters.

Every constant is below with its source or marked as an assumption.
"""

from __future__ import annotations

import sys

from bench.roofline import GPUS

# Qwen3-VL-2B-Instruct, language model (its config.json: 28 layers, hidden 2,048, 16 query heads,
# 8 KV heads of 128, MLP 6,144, vocabulary 151,936, tied embeddings); the vision tower runs only
# at prefill and is left out
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 28, 2048, 16, 8, 128, 6144, 151_936
BYTES = 2                       # bf16
# the paper's step (configs/paper_2b.yaml): 32 prompts × 8 rollouts on 8 GPUs, 2,048 new tokens
ROLLOUTS_PER_GPU, RESPONSE = 32, 2048
PROMPT = 768                    # assumption: image + question tokens (the memory estimate's)
# assumptions (rough, to be replaced by a GPU measurement):
EFFICIENCY = 0.5                # achieved / peak HBM bandwidth of a decode step, both engines
HOST_S = {"hf": 20e-3,          # eager: ~28 layers × ~25 kernels × ~25 µs of dispatch + sampling
          "vllm": 1e-3}         # CUDA graph replay + scheduler
KV_TRAFFIC = {"hf": 3, "vllm": 1}
MFU = 0.4                       # score and update, of the dense bf16 peak
GPU = "H200"


def params() -> int:
    """Language-model parameters (the tied embedding counted once, read as the lm_head)."""
    attn = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2
    return LAYERS * (attn + 3 * HIDDEN * MLP) + VOCAB * HIDDEN


def kv_bytes_per_token() -> int:
    return 2 * LAYERS * KV_HEADS * HEAD_DIM * BYTES


def rollout_s(engine: str, gpu: str = GPU) -> float:
    """Seconds to decode ``RESPONSE`` tokens for ``ROLLOUTS_PER_GPU`` sequences on one GPU."""
    bw = next(g for g in GPUS if g.name == gpu).hbm_bytes * EFFICIENCY
    weights, kv = params() * BYTES, kv_bytes_per_token() * KV_TRAFFIC[engine]
    return sum(max((weights + ROLLOUTS_PER_GPU * kv * (PROMPT + t)) / bw, HOST_S[engine])
               for t in range(1, RESPONSE + 1))


def train_s(gpu: str = GPU) -> dict:
    """Seconds of scoring (3 streams) and of the LoRA update over the batch, compute-bound."""
    flops = next(g for g in GPUS if g.name == gpu).bf16_flops * MFU
    tokens = ROLLOUTS_PER_GPU * (PROMPT + RESPONSE)
    return {"score": 3 * 2 * params() * tokens / flops, "update": 6 * params() * tokens / flops}


def estimate(gpu: str = GPU) -> dict:
    """Per engine: rollout, score, update and step seconds, and the assumptions they rest on."""
    rest = train_s(gpu)
    out = {"gpu": gpu, "params": params(), "prompt": PROMPT, "response": RESPONSE,
           "rollouts_per_gpu": ROLLOUTS_PER_GPU, "efficiency": EFFICIENCY, "mfu": MFU,
           "host_s": dict(HOST_S), "kv_traffic": dict(KV_TRAFFIC)}
    for engine in ("hf", "vllm"):
        roll = rollout_s(engine, gpu)
        out[engine] = {"rollout_s": roll, **{f"{k}_s": v for k, v in rest.items()},
                       "step_s": roll + sum(rest.values())}
    return out


def main() -> int:
    e = estimate()
    print(f"Estimated paper step on 8 × {e['gpu']} (Qwen3-VL-2B, {e['params'] / 1e9:.2f} B "
          "language-model parameters), seconds:")
    for engine in ("hf", "vllm"):
        print(f"  {engine:5s} " + ", ".join(f"{k} {v:.1f}" for k, v in e[engine].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
