"""Local copies of the five benchmarks, scored with the project's rollout engine and grader.

A data directory holds ``<key>.parquet``, ``<key>.jsonl`` or ``<key>.json`` per benchmark (keys:
dynamath, logicvista, mathvision, mmmu, wemath), rows in the schema of the hub dataset that
lmms-eval loads (images as ``{"bytes", "path"}``, bytes, a data URI or a path relative to the file):

- dynamath (kcz358/DynaMath): ``id``, ``question``, ``decoded_image``, ``ground_truth``,
  ``answer_type`` ("multiple choice" marks a letter answer);
- logicvista (lscpku/LogicVista): ``question``, ``image``, ``answer`` (option letters; an id
  from ``id`` or ``index`` when present, else the row number);
- mathvision (MathLLMs/MathVision): ``id``, ``question``, ``options`` (list, may be empty),
  ``decoded_image``, ``answer`` (a letter when there are options);
- mmmu (MMMU validation): ``id``, ``question``, ``options`` (a Python-literal list string),
  ``question_type`` ("multiple-choice" or "open"), ``image_1`` .. ``image_7``, ``answer``;
- wemath (We-Math/We-Math): ``ID``, ``question``, ``option``, ``image_path``, ``answer``.

Prompts are the project's: the question (with its options, as lmms-eval lists them) + the training
format suffix asking for the final answer in ``\\boxed{}``; no system prompt. Scoring: the last
``\\boxed{}`` is the answer. Multiple choice: a letter (``B``, ``(B)``, ``B.``, ``B: text``) or the
exact text of an option counts as that option; several letters (LogicVista) must match as a set.
Otherwise `cepo.grading.Grader` decides (normalised match, then math-verify); an MMMU open answer
given as a list of accepted answers is right if any matches. README ("Paper evaluation") lists
how this differs from lmms-eval's scoring. The k samples of a question are one group of the
rollout engine; torch's generator is seeded once with ``--seed`` before the first benchmark.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cepo.data import Example, encode_prompt
from cepo.evalsuite.benchmarks import Benchmark, SamplingSettings
from cepo.grading import Grader, extract_boxed, normalize_answer
from cepo.rollout import EvalRolloutConfig, HFRolloutEngine, RolloutEngine
from cepo.sources import load_image, read_file

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGH"
_LETTER = re.compile(r"^\(?\s*([A-H])\s*\)?\s*(?:[.:)]\s*.*)?$", re.DOTALL)
_LETTER_SET = re.compile(r"^[A-H](?:\s*[,;&]?\s*(?:and\s+)?[A-H])*$")
_MMMU_IMAGE = re.compile(r"<image (\d+)>")


@dataclass(frozen=True)
class Item:
    """One question: its prompt (an `Example`), accepted answers and option texts."""

    qid: str
    example: Example
    answers: tuple[str, ...]  # accepted answers (a letter string for multiple choice)
    options: tuple[str, ...] = ()  # option texts, A first
    multiple_choice: bool = False


# --------------------------------------------------------------------------- schemas


def _need(row: dict, fields: Sequence[str], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise KeyError(f"{where} lacks field(s) {missing}; fields present: {sorted(row)}")


def _image(row: dict, field: str, base: Path, where: str):
    image, why = load_image(row[field], base)
    if image is None:
        raise ValueError(f"{where}: field {field!r} is not a usable image ({why})")
    return image


def _listed(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def _text(text) -> str:
    return str(text).replace("<image>", "[image]").strip()  # `<image>` marks image slots


def _dynamath(row, base, where):
    _need(row, ("question", "decoded_image", "ground_truth"), where)
    mc = str(row.get("answer_type", "")).lower() == "multiple choice"
    ex = Example(_text(row["question"]), str(row["ground_truth"]).strip(),
                 (_image(row, "decoded_image", base, where),))
    return row.get("id"), ex, (ex.answer,), (), mc


def _logicvista(row, base, where):
    _need(row, ("question", "image", "answer"), where)
    ex = Example(_text(row["question"]), str(row["answer"]).strip(),
                 (_image(row, "image", base, where),))
    mc = bool(_LETTER_SET.match(ex.answer))
    return row.get("id", row.get("index")), ex, (ex.answer,), (), mc


def _mathvision(row, base, where):
    _need(row, ("question", "options", "answer"), where)
    field = "decoded_image" if row.get("decoded_image") is not None else "image"
    options = tuple(str(o) for o in (row["options"] or ()))
    text = _text(row["question"]) + (f"\nChoices:\n{_listed(options)}" if options else "")
    ex = Example(text, str(row["answer"]).strip(), (_image(row, field, base, where),))
    return row.get("id"), ex, (ex.answer,), options, bool(options)


def _mmmu(row, base, where):
    _need(row, ("id", "question", "options", "question_type", "answer"), where)
    try:
        options = tuple(str(o) for o in ast.literal_eval(row["options"] or "[]"))
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"{where}: field 'options' is not a list literal: {err}") from None
    mc = row["question_type"] == "multiple-choice"
    text = _text(row["question"]) + (f"\n{_listed(options)}" if mc and options else "")
    refs = _MMMU_IMAGE.findall(text)
    order = list(dict.fromkeys(refs)) or [str(i) for i in range(1, 8) if row.get(f"image_{i}")]
    images = tuple(_image(row, f"image_{i}", base, where) for i in order)
    answer = str(row["answer"]).strip()
    answers = (answer,)
    if not mc and answer.startswith("["):  # open answers are sometimes a list of accepted ones
        try:
            answers = tuple(str(a).strip() for a in ast.literal_eval(answer))
        except (ValueError, SyntaxError):
            pass
    ex = Example(_MMMU_IMAGE.sub(lambda m: f"[image {m.group(1)}]", text), answer, images)
    return row["id"], ex, answers, options, mc


def _wemath(row, base, where):
    _need(row, ("question", "option", "image_path", "answer"), where)
    ex = Example(f"{_text(row['question'])}\n{_text(row['option'])}", str(row["answer"]).strip(),
                 (_image(row, "image_path", base, where),))
    return row.get("ID"), ex, (ex.answer,), (), bool(_LETTER_SET.match(ex.answer))


_SCHEMAS = {"dynamath": _dynamath, "logicvista": _logicvista, "mathvision": _mathvision,
            "mmmu": _mmmu, "wemath": _wemath}


def find_local(data_dir: str | Path, bench: Benchmark) -> Path | None:
    """The local copy of `bench` in `data_dir` (``<key>.parquet|jsonl|json``), or None."""
    found = [Path(data_dir) / f"{bench.key}{ext}" for ext in (".parquet", ".jsonl", ".json")]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise ValueError(f"{data_dir}: several copies of {bench.key}: {[p.name for p in found]}")
    return found[0] if found else None


def load_items(path: Path, bench: Benchmark, *, limit: int | None = None) -> list[Item]:
    """Every row of a local copy as an `Item`; a malformed row is an error naming it."""
    rows = read_file(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    rows = rows[:limit] if limit else rows
    items, convert = [], _SCHEMAS[bench.key]
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        qid, example, answers, options, mc = convert(row, path.parent, where)
        if not example.answer:
            raise ValueError(f"{where}: empty answer")
        if mc and not all(_LETTER_SET.match(a) for a in answers):
            raise ValueError(f"{where}: multiple-choice answer {example.answer!r} is not letters")
        qid = str(qid) if qid is not None else f"row-{i}"
        items.append(Item(qid, Example(example.problem, example.answer, example.images, qid),
                          answers, options, mc))
    ids = [it.qid for it in items]
    if len(set(ids)) != len(ids):  # ids must key per-question results: fall back to row numbers
        logger.warning("%s: question ids repeat; using row numbers as ids", path)
        items = [Item(f"row-{i}", it.example, it.answers, it.options, it.multiple_choice)
                 for i, it in enumerate(items)]
    return items


# --------------------------------------------------------------------------- scoring


def letters(answer: str | None, options: Sequence[str] = ()) -> str | None:
    """The option letter(s) an extracted answer names, sorted (``"AC"``), or None."""
    if answer is None:
        return None
    bare = answer.strip().replace("\\text{", "").replace("}", "").strip()
    match = _LETTER.match(bare)
    if match:
        return match.group(1)
    if _LETTER_SET.match(bare):
        return "".join(sorted(set(re.findall(r"[A-H]", bare))))
    norm = normalize_answer(answer.strip()).lower()
    for i, option in enumerate(options):
        if norm and normalize_answer(option).lower() == norm:
            return LETTERS[i]
    return None


def grade(items: Sequence[Item], texts: Sequence[str], grader: Grader) -> list[float]:
    """1.0/0.0 per (item, response) pair."""
    scores: list[float | None] = []
    pending: list[tuple[int, str, str]] = []  # (position, answer, accepted) for the grader
    for pos, (item, text) in enumerate(zip(items, texts, strict=True)):
        answer = extract_boxed(text)
        if item.multiple_choice:
            gold = {"".join(sorted(set(re.findall(r"[A-H]", a)))) for a in item.answers}
            scores.append(float(letters(answer, item.options) in gold))
        elif answer is None:
            scores.append(0.0)
        else:
            scores.append(None)
            pending += [(pos, answer, accepted) for accepted in item.answers]
    verdicts = grader.grade_many([(a, g) for _, a, g in pending]) if pending else []
    for (pos, _, _), ok in zip(pending, verdicts):
        scores[pos] = max(scores[pos] or 0.0, float(ok))
    return [float(s) for s in scores]


def score_items(
    items: Sequence[Item], model, processor, *, settings: SamplingSettings, samples: int,
    grader: Grader, batch_size: int = 8, engine: RolloutEngine | None = None,
) -> tuple[dict[str, list[float]], list[str]]:
    """``{qid: [k scores]}`` for `items`, and the ids of prompts too long for max_model_len
    (scored 0 on every sample, so that two runs always cover the same questions)."""
    engine = engine or HFRolloutEngine(model, processor)
    limit = settings.max_model_len - settings.max_new_tokens
    config = EvalRolloutConfig(
        group_size=samples, temperature=settings.temperature, top_p=settings.top_p,
        top_k=settings.top_k, presence_penalty=settings.presence_penalty,
        max_new_tokens=settings.max_new_tokens, max_prompt_tokens=limit,
    )
    scores: dict[str, list[float]] = {}
    too_long: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk, prompts = [], []
        for item in items[start : start + batch_size]:
            prompt = encode_prompt(processor, item.example)
            if prompt.input_ids.numel() > limit:
                too_long.append(item.qid)
                scores[item.qid] = [0.0] * samples
                continue
            chunk.append(item)
            prompts.append(prompt)
        if not prompts:
            continue
        with torch.no_grad():
            rollouts = engine.generate(prompts, config)
        rows = [it for it in chunk for _ in range(samples)]
        graded = grade(rows, rollouts.texts, grader)
        for i, item in enumerate(chunk):
            scores[item.qid] = graded[i * samples : (i + 1) * samples]
    if too_long:
        logger.warning("%d prompt(s) longer than %d tokens scored as wrong", len(too_long), limit)
    return scores, too_long
