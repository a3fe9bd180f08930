"""The paper's evaluation: five multimodal math-reasoning benchmarks, with error bars.

``python -m cepo.eval --suite paper`` scores a model on DynaMath, LogicVista, MathVision-testmini,
MMMU-val and WeMath-testmini and writes a table in the paper's layout beside the paper's numbers.
Two backends share one results format (`report`):

- `lmms`: lmms-eval 0.7 through vLLM, as the paper ran it (GPU machines only);
- `native`: local copies of the benchmarks in their hub schemas, sampled with the project's
  rollout engine and scored with its grader (offline, CPU or GPU).

`stats` turns per-question scores into mean ± 95% CI and paired differences (``--compare``).
"""

from cepo.evalsuite.benchmarks import BENCHMARKS, PAPER_SETTINGS, Benchmark, SamplingSettings

__all__ = ["BENCHMARKS", "PAPER_SETTINGS", "Benchmark", "SamplingSettings"]
