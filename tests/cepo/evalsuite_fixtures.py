"""Tiny local copies of the five benchmarks, each in its hub dataset's schema (built in tests)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def hub_image(color) -> dict:
    return {"bytes": png(color), "path": None}  # how `datasets` stores an Image feature


# question id -> expected accepted answer, per benchmark (what the tests script responses for)
ROWS = {
    "dynamath": [
        {"id": "1", "question": "What is 2 + 3?", "image": "images/1.png",
         "decoded_image": hub_image((255, 0, 0)), "ground_truth": "5", "answer_type": "float",
         "subject": "arithmetic", "knowledge_level": "elementary school"},
        {"id": "2", "question": "Which bar is tallest?\nA: left\nB: middle\nC: right",
         "image": "images/2.png", "decoded_image": hub_image((0, 255, 0)), "ground_truth": "B",
         "answer_type": "multiple choice", "subject": "graph", "knowledge_level": "high school"},
    ],
    "logicvista": [
        {"question": "Which two shapes are identical? A. a B. b C. c D. d",
         "image": None, "answer": "A, C"},
        {"question": "Which shape comes next? A. a B. b", "image": None, "answer": "B"},
    ],
    "mathvision": [
        {"id": "7", "question": "<image1> How many dots are there?", "options": [],
         "image": "images/7.jpg", "decoded_image": hub_image((0, 0, 255)), "answer": "12",
         "solution": None, "level": 1, "subject": "counting"},
        {"id": "8", "question": "<image1> Which is the length of the side?",
         "options": ["3", "4", "5"], "image": "images/8.jpg",
         "decoded_image": hub_image((9, 9, 9)), "answer": "B", "solution": None, "level": 2,
         "subject": "metric geometry - length"},
    ],
    "mmmu": [
        {"id": "validation_Math_1", "question": "<image 1> What is x?",
         "options": "['1', '2', '3']", "explanation": "", "image_1": hub_image((1, 2, 3)),
         "image_2": None, "img_type": "['Diagrams']", "answer": "C",
         "topic_difficulty": "Easy", "question_type": "multiple-choice", "subfield": "Algebra"},
        {"id": "validation_Math_2", "question": "<image 1> and <image 2>: what is the ratio?",
         "options": "[]", "explanation": "", "image_1": hub_image((4, 5, 6)),
         "image_2": hub_image((7, 8, 9)), "img_type": "['Diagrams']", "answer": "['0.5', '1/2']",
         "topic_difficulty": "Medium", "question_type": "open", "subfield": "Algebra"},
    ],
    "wemath": [
        {"ID": "3steps_101", "split": "testmini", "knowledge concept": "Area",
         "question": "What is the side length?", "option": "A. 3cm; B. 4cm; C. 5cm",
         "image_path": "wemath_images/101.png", "answer": "B", "key": "3steps_1",
         "question number": 101, "knowledge concept description": "area of a square"},
    ],
}


def write_benchmarks(directory: Path) -> Path:
    """DynaMath, MathVision and MMMU as parquet; LogicVista (data-URI images) and WeMath (an
    image file next to the data) as JSON lines."""
    directory.mkdir(parents=True, exist_ok=True)
    _parquet(directory / "dynamath.parquet", ROWS["dynamath"])
    _parquet(directory / "mathvision.parquet", ROWS["mathvision"])
    _parquet(directory / "mmmu.parquet", ROWS["mmmu"])
    uri = "data:image/png;base64," + base64.b64encode(png((50, 60, 70))).decode()
    _jsonl(directory / "logicvista.jsonl", [{**r, "image": uri} for r in ROWS["logicvista"]])
    (directory / "wemath_images").mkdir(exist_ok=True)
    (directory / "wemath_images" / "101.png").write_bytes(png((80, 90, 100)))
    _jsonl(directory / "wemath.jsonl", ROWS["wemath"])
    return directory
