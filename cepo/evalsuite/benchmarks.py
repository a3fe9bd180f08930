"""The five benchmarks, the paper's sampling settings and the paper's own numbers (Table 2)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Benchmark:
    key: str  # short name: results keys, local file names (``<key>.parquet``)
    title: str  # column header in the paper's table
    task: str  # lmms-eval 0.7 task name
    hub: str  # the hub dataset lmms-eval loads (its schema is what `native` reads)
    split: str


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("dynamath", "DynaMath", "dynamath_reasoning", "kcz358/DynaMath", "test"),
    Benchmark("logicvista", "LogicVista", "logicvista_reasoning", "lscpku/LogicVista", "test"),
    Benchmark("mathvision", "MathVision-mini", "mathvision_testmini", "MathLLMs/MathVision",
              "testmini"),
    Benchmark("mmmu", "MMMU", "mmmu_val", "lmms-lab-encoder/MMMU", "validation"),
    Benchmark("wemath", "WeMath", "wemath_testmini_reasoning", "We-Math/We-Math", "testmini"),
)
BY_KEY = {b.key: b for b in BENCHMARKS}


@dataclass(frozen=True)
class SamplingSettings:
    """How every benchmark is sampled. Defaults are the paper's (lmms-eval through vLLM)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    presence_penalty: float = 2.0
    max_new_tokens: int = 32_000
    max_model_len: int = 40_000  # prompt + response tokens
    dtype: str = "bfloat16"

    def __post_init__(self):
        if self.max_new_tokens >= self.max_model_len:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be below max_model_len "
                f"({self.max_model_len}): the prompt needs room too"
            )

    def to_dict(self) -> dict:
        return asdict(self)


PAPER_SETTINGS = SamplingSettings()

# Paper Table 2 (accuracy %, trained on Geo3k for 50 steps), columns in BENCHMARKS order + Avg.
# OPSD and SDPO are published as averages only.
PAPER_RESULTS: dict[str, dict[str, tuple[float | None, ...]]] = {
    "2B": {
        "Base": (50.08, 32.81, 19.41, 44.11, 52.24, 39.73),
        "GRPO": (50.36, 37.50, 21.05, 42.33, 54.60, 41.17),
        "RLSD": (50.36, 36.38, 23.39, 39.44, 55.26, 40.05),
        "OPSD": (None, None, None, None, None, 34.96),
        "SDPO": (None, None, None, None, None, 35.70),
        "CEPO": (51.44, 37.72, 25.99, 45.78, 56.21, 43.43),
    },
    "4B": {
        "Base": (64.59, 54.91, 44.41, 53.56, 74.31, 58.36),
        "GRPO": (63.97, 54.98, 42.76, 52.34, 73.10, 57.43),
        "RLSD": (65.07, 56.92, 44.08, 53.22, 73.28, 58.51),
        "OPSD": (None, None, None, None, None, 56.23),
        "SDPO": (None, None, None, None, None, 55.75),
        "CEPO": (65.37, 61.16, 47.37, 54.11, 74.77, 60.56),
    },
}
PAPER_NOTES = {
    "2B": "OPSD and SDPO: averages only in the paper. RLSD's reported average (40.05) is not "
    "the mean of its row (40.97).",
    "4B": "OPSD and SDPO: averages only in the paper.",
}


def paper_size(model_name: str) -> str | None:
    """``"2B"``/``"4B"`` for a Qwen3-VL model name or path that says so, else None."""
    match = re.search(r"(?<![0-9.])([24])B(?![a-zA-Z0-9])", model_name, re.IGNORECASE)
    return f"{match.group(1)}B" if match else None


def select(keys: list[str] | None) -> tuple[Benchmark, ...]:
    """The benchmarks named by `keys` (all when None), in the paper's order."""
    if not keys:
        return BENCHMARKS
    unknown = sorted(set(keys) - set(BY_KEY))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {sorted(BY_KEY)}")
    return tuple(b for b in BENCHMARKS if b.key in keys)
