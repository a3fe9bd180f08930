"""Reading Geo3k-schema rows: files, directories, saved `datasets`, the hub; decoding images;
the checks on values that `cepo.data` turns into skipped-row reasons.

Rows come back raw (dicts); `cepo.data.load_geo3k` makes examples of them. A file that is not rows
(not JSON, not objects, not UTF-8) is a `DataError` naming the file and line; a source that is
neither local nor reachable is `NotAvailable`, saying what to pass instead.
"""

from __future__ import annotations

import base64
import io
import json
import math
import numbers
import warnings
from pathlib import Path

from PIL import Image

from cepo.errors import DataError, NotAvailable

# Qwen-VL image processors refuse a longer side over 200 x the shorter one (smart_resize).
MAX_ASPECT_RATIO = 200


def read_rows(source: str, split: str) -> tuple[list[dict], Path | None]:
    path = Path(source).expanduser()
    if path.is_file():
        return read_file(path), path.parent
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _read_saved_dataset(path, split), path
        files = sorted(
            p for p in path.rglob("*") if p.suffix in (".parquet", ".jsonl") and split in p.name
        )
        if not files:
            raise FileNotFoundError(
                f"{source}: no *{split}*.parquet / *{split}*.jsonl file and no saved `datasets` "
                "directory found"
            )
        return [row for f in files for row in read_file(f)], path
    if "/" in source and not source.startswith((".", "/", "~")):
        return _read_hub(source, split), None
    raise NotAvailable(f"data set {source!r} is neither a file, a directory nor a hub id; pass a "
                       "parquet/JSON-lines file or directory, or synthetic")


def read_file(path: Path) -> list[dict]:
    """The rows of one parquet or JSON-lines file; a bad line names the file and line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err})") from None
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = _json(text, path, 1)
            return [_object(row, path, f"item {i}") for i, row in enumerate(rows)]
        return [_object(_json(line, path, n), path, f"line {n}")
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (parquet, jsonl or json)")


def _json(text: str, path: Path, first_line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {first_line + err.lineno - 1}: not JSON ({err.msg}, "
                        f"column {err.colno})") from None


def _object(row, path: Path, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{path}, {where}: a row must be a JSON object with problem, answer and "
                        f"images; got a {type(row).__name__}")
    return row


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KeyError(f"{path}: no split {split!r}; available: {list(ds)}")
        ds = ds[split]
    return ds.data.table.to_pylist()  # raw arrow rows: images stay undecoded {bytes, path}


def _read_hub(source: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as err:
        raise NotAvailable(
            f"data set {source!r} is not a local path and could not be loaded from the hub "
            f"(offline? {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "download it and pass its directory or file (--data.train PATH, or --data for "
            "cepo.eval), or use the built-in synthetic set (synthetic)"
        ) from err
    return ds.data.table.to_pylist()


def answer_text(answer) -> tuple[str | None, str]:
    """The ground truth as text, or (None, why not). Numbers (3, 2.5) are fine as user data;
    a bool, NaN, a list or a dict would be graded as the text 'True', 'nan', '[1, 2]'."""
    if answer is None:
        return None, "missing answer"
    if isinstance(answer, numbers.Real) and not isinstance(answer, bool):
        if not math.isfinite(answer):
            return None, "answer not a finite number"
        answer = str(answer)
    if not isinstance(answer, str):
        return None, f"answer not text ({type(answer).__name__})"
    return (answer.strip(), "") if answer.strip() else (None, "missing answer")


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")  # a lone surrogate ('\ud800') fails here and in every tokenizer
        return True
    except UnicodeEncodeError:
        return False


def decode_image(item, base_dir: Path | None) -> Image.Image | None:
    """PIL image (RGB) from a PIL image, bytes, ``{"bytes", "path"}``, a path or a data URI."""
    return load_image(item, base_dir)[0]


def load_image(item, base_dir: Path | None) -> tuple[Image.Image | None, str]:
    """`decode_image` with the reason for a refusal; images the processor would refuse (aspect
    ratio over `MAX_ASPECT_RATIO`, no pixels) and decompression bombs are refused here."""
    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x its pixel limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open_image(item, base_dir)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image too large (decompression bomb)"
    if image is None:
        return None, "bad image"
    width, height = image.size
    if min(width, height) < 1:
        return None, "image has no pixels"
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        return None, f"image aspect ratio over {MAX_ASPECT_RATIO}"
    return image, ""


def _open_image(item, base_dir: Path | None) -> Image.Image | None:
    try:
        if isinstance(item, Image.Image):
            image = item
        elif isinstance(item, dict):
            if item.get("bytes"):
                image = Image.open(io.BytesIO(item["bytes"]))
            elif item.get("path"):
                return _open_image(item["path"], base_dir)
            else:
                return None
        elif isinstance(item, (bytes, bytearray)):
            image = Image.open(io.BytesIO(item))
        elif isinstance(item, str) and item.startswith("data:image"):
            image = Image.open(io.BytesIO(base64.b64decode(item.split(",", 1)[1])))
        elif isinstance(item, str):
            p = Path(item)
            if not p.is_absolute() and base_dir is not None:
                p = base_dir / p
            image = Image.open(p)
        else:
            return None
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, TypeError):  # corrupt data; a non-bytes "bytes"
        return None
