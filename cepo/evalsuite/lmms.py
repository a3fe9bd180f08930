"""The paper's evaluation through lmms-eval 0.7 and vLLM (GPU machines only).

One lmms-eval run per sample: sample j uses the sampling seed ``seed + j`` (vLLM's per-request
seed, lmms-eval ``--gen_kwargs seed=``), so two models compared with the same seed see the same
seeds. Per-question scores are read back from lmms-eval's ``--log_samples`` files
(``<output>/<model>/<date>_samples_<task>.jsonl``, one JSON line per document):

- dynamath_reasoning: ``dynamath_average.acc``;
- logicvista_reasoning, wemath_testmini_reasoning: ``acc_score`` (WeMath's loose/strict scores are
  aggregates over question groups, not per-question; lmms-eval prints them in its own table);
- mathvision_testmini: ``mathvision_standard_eval.scores[0]``;
- mmmu_val: ``mmmu_acc`` (parsed prediction vs answer, MMMU's own rule; `mmmu_correct`).

lmms-eval needs torchvision; the index's torchvision wheel is built against CUDA torch and does not
import with a CPU torch, so this path is for GPU machines (``pip install -e '.[eval]' vllm``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cepo.evalsuite.benchmarks import Benchmark, SamplingSettings

logger = logging.getLogger(__name__)


def check_installed() -> None:
    """A clear error before any work when lmms-eval or vLLM is missing."""
    missing = [m for m in ("lmms_eval", "vllm") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(
            f"--suite paper without --data-dir runs lmms-eval through vLLM, but {missing} "
            "is not installed; on a GPU machine: pip install -e '.[eval]' vllm. Without a GPU, "
            "score local copies instead: --data-dir DIR (see README, 'Paper evaluation')"
        )


def model_args(model_path: str, settings: SamplingSettings, *, tensor_parallel_size: int = 1,
               gpu_memory_utilization: float = 0.85) -> str:
    if "," in model_path or "=" in model_path:
        raise ValueError(f"model path {model_path!r} contains ',' or '=', which lmms-eval's "
                         "--model_args cannot carry; move or link it")
    return ",".join([
        f"model={model_path}", f"dtype={settings.dtype}", f"max_model_len={settings.max_model_len}",
        f"max_new_tokens={settings.max_new_tokens}", f"tensor_parallel_size={tensor_parallel_size}",
        f"gpu_memory_utilization={gpu_memory_utilization}",
    ])


def gen_kwargs(settings: SamplingSettings, seed: int) -> str:
    """Task generation settings; they replace each task's own (e.g. MMMU's 128 tokens)."""
    return ",".join([
        f"temperature={settings.temperature}", f"top_p={settings.top_p}",
        f"top_k={settings.top_k}", f"presence_penalty={settings.presence_penalty}",
        f"max_new_tokens={settings.max_new_tokens}", f"seed={seed}",
    ])


def build_command(model_path: str, output_dir: Path, benchmarks: Sequence[Benchmark], *,
                  settings: SamplingSettings, seed: int, batch_size: int = 64,
                  limit: int | None = None, tensor_parallel_size: int = 1) -> list[str]:
    cmd = [
        sys.executable, "-m", "lmms_eval",
        "--model", "vllm",
        "--model_args", model_args(model_path, settings,
                                   tensor_parallel_size=tensor_parallel_size),
        "--tasks", ",".join(b.task for b in benchmarks),
        "--gen_kwargs", gen_kwargs(settings, seed),
        "--batch_size", str(batch_size),
        "--seed", ",".join([str(seed)] * 4),
        "--log_samples",
        "--output_path", str(output_dir),
    ]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def run(model_path: str, out_dir: Path, benchmarks: Sequence[Benchmark], *, samples: int,
        seed: int, settings: SamplingSettings, **kwargs) -> dict[str, dict[str, list[float]]]:
    """Run lmms-eval `samples` times; ``{benchmark: {doc_id: [k scores]}}``."""
    scores: dict[str, dict[str, list[float]]] = {b.key: {} for b in benchmarks}
    for j in range(samples):
        sample_dir = out_dir / "lmms-eval" / f"sample-{j}"
        cmd = build_command(model_path, sample_dir, benchmarks, settings=settings,
                            seed=seed + j, **kwargs)
        logger.info("lmms-eval sample %d/%d: %s", j + 1, samples, " ".join(cmd))
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"lmms-eval exited with status {done.returncode} on sample {j} "
                               f"(command: {' '.join(cmd)}); its log is above")
        for bench in benchmarks:
            for qid, score in read_samples(sample_dir, bench).items():
                scores[bench.key].setdefault(qid, []).append(score)
    for bench in benchmarks:
        short = [q for q, s in scores[bench.key].items() if len(s) != samples]
        if short:
            raise RuntimeError(f"{bench.task}: {len(short)} document(s) lack a score in some "
                               f"sample run (e.g. {short[:3]})")
    return scores


def samples_file(sample_dir: Path, bench: Benchmark) -> Path:
    found = sorted(sample_dir.glob(f"**/*_samples_{bench.task}.jsonl"))
    if len(found) != 1:
        raise FileNotFoundError(f"{sample_dir}: expected one lmms-eval samples file for "
                                f"{bench.task}, found {[str(f) for f in found]}")
    return found[0]


def read_samples(sample_dir: Path, bench: Benchmark) -> dict[str, float]:
    """``{doc_id: score in [0, 1]}`` from one run's samples file."""
    path = samples_file(sample_dir, bench)
    out: dict[str, float] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            out[str(doc["doc_id"])] = float(_score(bench.task, doc))
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ValueError(f"{path} line {n}: no per-question score for {bench.task} "
                             f"({type(err).__name__}: {err})") from None
    return out


def _score(task: str, doc: dict) -> float:
    if task == "dynamath_reasoning":
        return doc["dynamath_average"]["acc"]
    if task in ("logicvista_reasoning", "wemath_testmini_reasoning"):
        return doc["acc_score"]
    if task == "mathvision_testmini":
        return bool(doc["mathvision_standard_eval"]["scores"][0])
    if task == "mmmu_val":
        acc = doc["mmmu_acc"]
        return any(mmmu_correct(acc["answer"], pred, acc["question_type"])
                   for pred in acc["parsed_pred"])
    raise KeyError(task)


def mmmu_correct(gold, pred, question_type: str) -> bool:
    """MMMU's rule, as lmms-eval applies it: a multiple-choice letter must equal the answer; an
    open answer is right when a normalised gold string occurs in a predicted candidate, or a
    predicted number equals a gold number (2 decimals)."""
    golds = gold if isinstance(gold, list) else [gold]
    if question_type == "multiple-choice":
        return pred in golds
    norm = [n for g in golds for n in _mmmu_normalize(str(g))]
    for cand in pred if isinstance(pred, list) else [pred]:
        if isinstance(cand, str):
            if any(isinstance(n, str) and n in cand for n in norm):
                return True
        elif cand in norm:
            return True
    return False


def _mmmu_normalize(text: str) -> list:
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]
