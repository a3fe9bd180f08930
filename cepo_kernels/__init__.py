"""cepo_kernels: fused per-token log-probs for the policy and the CEPO teachers, straight from
hidden states and the lm_head weight (no N×V logits), plus CEPO token weights and the PPO loss.

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked, any device),
"auto" (triton on CUDA tensors, torch otherwise). Every result names the backend that ran.
"""

from .advantages import cepo_advantages
from .backend import BACKENDS, resolve_backend
from .functional import (
                         ContrastiveEvidence,
                         ContrastiveLogProbs,
                         LogProbsOutput,
                         contrastive_evidence,
                         contrastive_logprobs,
                         fused_linear_logprobs,
)
from .loss import AGGREGATIONS, PPOLossOutput, ppo_clip_loss
from .modules import CEPOLoss, FusedLinearLogProbs

__all__ = [
    "AGGREGATIONS", "BACKENDS", "CEPOLoss", "ContrastiveEvidence", "ContrastiveLogProbs",
    "FusedLinearLogProbs", "LogProbsOutput", "PPOLossOutput", "cepo_advantages",
    "contrastive_evidence", "contrastive_logprobs", "fused_linear_logprobs", "ppo_clip_loss",
    "resolve_backend",
]
__version__ = "0.1.0"
