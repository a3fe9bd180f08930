"""`CEPOConfig`: TRL's `GRPOConfig` plus the CEPO settings (docs/METHOD.md, "Advantages",
"Schedules" and "Teachers"), the generation index the λ schedule (`cepo.schedule.lam_at`) counts,
and fp32 by default without a bf16 GPU.

Every CEPO field is prefixed ``cepo_`` so none can collide with a GRPOConfig field (GRPOConfig
already has ``delta``, ``temperature``, ...). TRL's own defaults (loss type, clipping, ...) are left
untouched: switching trainers changes the advantages and nothing else.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from transformers import training_args as hf_training_args
from trl import GRPOConfig

from cepo.config import DEFAULT_EPS_W, DEFAULT_LAM_OFFSET, check_eps_w
from cepo.contexts import NEG_FALLBACKS

logger = logging.getLogger(__name__)

ALGOS = ("cepo", "rlsd")
NEG_CHOICES = ("worst", "most_frequent")  # "reference" needs the response texts TRL does not keep
TEACHER_MODELS = ("actor", "base")


def generation_index(global_step: int, micro_step: int, *, gradient_accumulation_steps: int,
                     steps_per_generation: int, num_iterations: int) -> int:
    """The 1-based index k of the generation batch being produced: one training step of
    docs/METHOD.md, "Schedules".

    TRL generates once every ``steps_per_generation * num_iterations`` micro-steps
    (forward/backward passes) and takes an optimizer step every ``gradient_accumulation_steps``
    (GA) of them, so ``global_step * GA + micro_step % GA`` micro-steps are done. On resume
    ``global_step`` comes back from the checkpoint and TRL's micro-step counter restarts at 0 (a
    multiple of GA, as at every checkpoint), so the schedule continues where it stopped.
    """
    ga = gradient_accumulation_steps
    done = global_step * ga + micro_step % ga
    return done // (steps_per_generation * num_iterations) + 1


@dataclass
class CEPOConfig(GRPOConfig):
    """GRPOConfig plus CEPO; defaults are the paper preset (docs/METHOD.md, "Presets")."""

    cepo_algo: str = field(default="cepo", metadata={
        "help": "'cepo' (r+ vs r- teachers) or 'rlsd' (r+ teacher vs the student)."})
    cepo_lambda_init: float = field(default=0.5, metadata={
        "help": "λ0: mixing weight of the token weights at the first generation batch."})
    cepo_lambda_warmup_steps: int = field(default=25, metadata={
        "help": "T_warm: λ decays linearly to 0 over this many generation batches; then the "
                "teacher passes are skipped (pure GRPO). 0 keeps λ = λ0 throughout."})
    cepo_lambda_offset: int | None = field(default=None, metadata={
        "help": "Shifts the λ decay by whole generation batches: λ_k = λ0 · max(0, 1 − (k − 1 + "
                "offset)/T_warm). None: 0 for cepo, 1 for rlsd (the reference RLSD script)."})
    cepo_eps_w: float | None = field(default=None, metadata={
        "help": "ε_w: token weights are clipped to [1 − ε_w, 1 + ε_w]. None: 0.5 for cepo (the "
                "paper; the reference CEPO script uses 0.2), 0.2 for rlsd (RLSD paper and "
                "script)."})
    cepo_neg_choice: str = field(default="worst", metadata={
        "help": "How r- is picked among the group's rejected rollouts: 'worst' (lowest reward, "
                "ties to the first) or 'most_frequent' (the most common wrong answer)."})
    cepo_num_neg: int = field(default=1, metadata={
        "help": "K wrong answers; K > 1 mixes their teachers as logmeanexp (extension)."})
    cepo_neg_fallback: str = field(default="student", metadata={
        "help": "Group without a usable wrong answer: 'student' (RLSD for that group, the paper) "
                "or 'positive' (r- = r+, i.e. GRPO, the reference code)."})
    cepo_teacher_images: bool = field(default=True, metadata={
        "help": "Teachers see the prompt's images; False: image-blind teachers as in the "
                "reference code (the image's tokens become pad tokens, no pixels)."})
    cepo_min_pixels: int | None = field(default=262_144, metadata={
        "help": "VLMs: every image is first resized to at least this many pixels, as the "
                "reference's dataset does (then by the processor's own rule), before generation, "
                "so generation and scoring see the same image. None: no lower bound."})
    cepo_max_pixels: int | None = field(default=4_194_304, metadata={
        "help": "VLMs: every image is first resized to at most this many pixels. None: no "
                "upper bound."})
    cepo_hint_template: str = field(default=" {answer}", metadata={
        "help": "Text inserted between the prompt and the response; must contain '{answer}'."})
    cepo_answer_column: str = field(default="answer", metadata={
        "help": "Dataset column with the ground-truth answer (r+; also what rollouts are "
                "graded against to find rejected ones)."})
    cepo_teacher_model: str = field(default="actor", metadata={
        "help": "'actor' (current weights) or 'base' (PEFT adapters disabled)."})
    cepo_backend: str = field(default="auto", metadata={
        "help": "cepo_kernels backend: 'auto', 'triton' or 'torch'."})
    cepo_prefix_sharing: str = field(default="auto", metadata={
        "help": "Teacher scoring encodes each prompt once for all its rows (cepo.prefix): "
                "'auto' (where the model allows, one process only), 'true' or 'false'."})
    cepo_grader_timeout_s: float = field(default=5.0, metadata={
        "help": "Time limit per graded answer (math-verify runs in a child process)."})

    def __post_init__(self):
        self._fit_precision()
        super().__post_init__()
        _choice("cepo_algo", self.cepo_algo, ALGOS)
        _choice("cepo_neg_choice", self.cepo_neg_choice, NEG_CHOICES)
        _choice("cepo_neg_fallback", self.cepo_neg_fallback, NEG_FALLBACKS)
        _choice("cepo_teacher_model", self.cepo_teacher_model, TEACHER_MODELS)
        _choice("cepo_backend", self.cepo_backend, ("auto", "triton", "torch"))
        _choice("cepo_prefix_sharing", str(self.cepo_prefix_sharing).lower(),
                ("auto", "true", "false"))
        if not (0.0 <= self.cepo_lambda_init <= 1.0 and math.isfinite(self.cepo_lambda_init)):
            raise ValueError(f"cepo_lambda_init must be in [0, 1], got {self.cepo_lambda_init}")
        if int(self.cepo_lambda_warmup_steps) != self.cepo_lambda_warmup_steps or \
                self.cepo_lambda_warmup_steps < 0:
            raise ValueError(f"cepo_lambda_warmup_steps must be an int >= 0, got "
                             f"{self.cepo_lambda_warmup_steps}")
        if self.cepo_eps_w is None:  # the native trainer's defaults (docs/METHOD.md, "Presets")
            self.cepo_eps_w = DEFAULT_EPS_W[self.cepo_algo]
        if self.cepo_lambda_offset is None:
            self.cepo_lambda_offset = DEFAULT_LAM_OFFSET[self.cepo_algo]
        if int(self.cepo_lambda_offset) != self.cepo_lambda_offset or self.cepo_lambda_offset < 0:
            raise ValueError(f"cepo_lambda_offset must be an int >= 0, got "
                             f"{self.cepo_lambda_offset}")
        check_eps_w(self.cepo_eps_w, "cepo_eps_w")
        if int(self.cepo_num_neg) != self.cepo_num_neg or self.cepo_num_neg < 1:
            raise ValueError(f"cepo_num_neg must be an int >= 1, got {self.cepo_num_neg}")
        for name in ("cepo_min_pixels", "cepo_max_pixels"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if None not in (self.cepo_min_pixels, self.cepo_max_pixels) and \
                self.cepo_min_pixels > self.cepo_max_pixels:
            raise ValueError(f"cepo_min_pixels={self.cepo_min_pixels} is above "
                             f"cepo_max_pixels={self.cepo_max_pixels}")
        if "{answer}" not in self.cepo_hint_template:
            raise ValueError(f"cepo_hint_template must contain '{{answer}}', got "
                             f"{self.cepo_hint_template!r}")
        if not self.cepo_answer_column:
            raise ValueError("cepo_answer_column must name a dataset column")
        if self.cepo_grader_timeout_s <= 0:
            raise ValueError(f"cepo_grader_timeout_s must be > 0, got {self.cepo_grader_timeout_s}")

    def _fit_precision(self) -> None:
        """GRPOConfig turns bf16 on by default, which transformers refuses without a bf16 device
        unless ``use_cpu=True``: here an unset ``bf16`` becomes fp32 on such a machine, and an
        explicit ``bf16=True`` fails naming the fix."""
        if self.use_cpu or self.fp16 or hf_training_args.is_torch_bf16_gpu_available() or \
                hf_training_args.is_torch_xla_available():
            return
        if self.bf16 is None:
            logger.warning("no bf16-capable GPU: CEPOConfig trains in fp32 (bf16=False); pass "
                           "bf16=True, use_cpu=True for bf16 autocast on the CPU")
            self.bf16 = False
        if self.bf16 or self.bf16_full_eval:
            name = "bf16" if self.bf16 else "bf16_full_eval"
            raise ValueError(f"{name}=True needs a bf16-capable GPU and none is available: pass "
                             f"{name}=False (fp32), or use_cpu=True to use bf16 on the CPU")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
