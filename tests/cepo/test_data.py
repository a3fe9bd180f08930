"""Geo3k-schema loading, the synthetic dataset and prompt building."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image

from cepo import sources
from cepo.data import (
    FORMAT_SUFFIX,
    Example,
    build_messages,
    encode_prompt,
    encode_prompts,
    iter_batches,
    load_geo3k,
    load_split,
    prompt_text,
)
from cepo.offline.synthetic import (
    DEFAULT_KINDS,
    VISUAL_KINDS,
    chain_solution,
    chain_terms,
    synthetic_dataset,
)


def _png(color="red", size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- synthetic


def _image_bytes(example: Example) -> bytes:
    return example.images[0].tobytes()


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = synthetic_dataset("train", size=12, seed=3), synthetic_dataset("train", size=12, seed=3)
    assert [e.answer for e in a] == [e.answer for e in b]
    assert [_image_bytes(e) for e in a] == [_image_bytes(e) for e in b]
    val = synthetic_dataset("val", size=12, seed=3)
    other = synthetic_dataset("train", size=12, seed=4)
    assert {_image_bytes(e) for e in a}.isdisjoint({_image_bytes(e) for e in val})
    assert [_image_bytes(e) for e in a] != [_image_bytes(e) for e in other]
    assert len(synthetic_dataset("train")) == 512 and len(synthetic_dataset("test")) == 128
    with pytest.raises(ValueError, match="synthetic split"):
        synthetic_dataset("dev")


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected True regions (an independent dot counter)."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]:
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return count


def test_synthetic_images_encode_their_answers(grader):
    examples = synthetic_dataset("train", size=40, seed=1, kinds=VISUAL_KINDS)
    checked = set()
    for e in examples:
        pixels = np.asarray(e.images[0]).astype(int)
        if "dots" in e.problem:
            assert _components(pixels.sum(-1) < 100) == int(e.answer)
        elif "area" in e.problem:
            orange = (pixels[..., 0] > 200) & (pixels[..., 1] > 100) & (pixels[..., 2] < 50)
            ys, xs = np.nonzero(orange)
            step = 64 // 8
            w = (xs.max() - xs.min() + 2) // step
            h = (ys.max() - ys.min() + 2) // step
            assert w * h == int(e.answer)
        elif "fraction" in e.problem:
            k, d = (int(x) for x in e.answer[len("\\frac{") : -1].split("}{"))
            assert 0 < k < d
            assert grader.grade(str(k / d), e.answer)  # checkable as a decimal, too
        else:
            assert "sum" in e.problem and int(e.answer) >= 2
        checked.add(e.problem)
    assert len(checked) == 4  # all four kinds appear


def test_chain_sums_state_their_terms_and_slips_carry_on():
    examples = synthetic_dataset("val", size=30, seed=2)
    assert synthetic_dataset("val", size=30, seed=2, kinds=DEFAULT_KINDS)[5].problem == \
        examples[5].problem
    for e in examples:
        terms = [int(x) for x in re.findall(r"\d+", e.problem)]
        assert len(terms) == 3 and all(1 <= t <= 9 for t in terms)
        assert chain_terms(e.problem) == terms and int(e.answer) == sum(terms)
        assert (np.asarray(e.images[0]) < 128).any()  # the sum is drawn too
    assert chain_terms("<image>How many dots are in the image?") is None
    assert chain_solution([3, 5, 2]) == ("3+5=8, 8+2=10", 10)
    # a slip in step 1 carries into step 2; a slip in step 2 leaves step 1 right
    assert chain_solution([3, 5, 2], [1, 0]) == ("3+5=9, 9+2=11", 11)
    assert chain_solution([3, 5, 2], [0, -2]) == ("3+5=8, 8+2=8", 8)


def test_synthetic_kinds_are_checked():
    with pytest.raises(ValueError, match="kinds.*'circles'"):
        synthetic_dataset("train", size=4, kinds=("chain_sum", "circles"))
    with pytest.raises(ValueError, match="kinds"):
        synthetic_dataset("train", size=4, kinds=())


def test_load_split_dispatches_synthetic():
    assert [e.answer for e in load_split("synthetic", "val", limit=5)] == [
        e.answer for e in synthetic_dataset("val", size=5)
    ]


def test_iter_batches_is_seeded_and_drops_the_remainder():
    items = synthetic_dataset("train", size=10)
    first = [[e.uid for e in b] for b in iter_batches(items, 4, seed=0, epoch=0)]
    again = [[e.uid for e in b] for b in iter_batches(items, 4, seed=0, epoch=0)]
    other = [[e.uid for e in b] for b in iter_batches(items, 4, seed=0, epoch=1)]
    assert first == again != other
    assert [len(b) for b in first] == [4, 4]


# --------------------------------------------------------------------------- prompts


def test_messages_split_on_image_markers():
    img = Image.new("RGB", (8, 8))
    e = Example(problem="  <image>Find x.  ", answer="3", images=(img,))
    assert build_messages(e) == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Find x." + FORMAT_SUFFIX}],
        }
    ]
    assert build_messages(e, with_images=False)[0]["content"] == [
        {"type": "text", "text": "Find x." + FORMAT_SUFFIX}
    ]
    unmarked = Example(problem="Find y.", answer="1", images=(img, img))
    kinds = [c["type"] for c in build_messages(unmarked)[0]["content"]]
    assert kinds == ["image", "image", "text"]


def test_format_suffix_is_the_one_docs_method_states():
    """The instruction users read in docs/METHOD.md is the one the prompts carry (the reference
    recipe's text, so a change to either is seen)."""
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "METHOD.md").read_text()
    quoted = re.search(r"followed by\n`(.+?)`;", doc, re.S)
    assert quoted, "docs/METHOD.md no longer quotes the prompt's instruction"
    text = " ".join(quoted.group(1).split("\n")).replace("\\n", "\n")
    assert text == FORMAT_SUFFIX
    assert FORMAT_SUFFIX.endswith("\\boxed{}.")  # what the grader extracts the answer from


def test_encode_prompt(processor, examples):
    e = examples[0]
    enc = encode_prompt(processor, e)
    text = prompt_text(processor, e)
    assert text.endswith("<|im_start|>assistant\n") and FORMAT_SUFFIX in text
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_image = int((enc.input_ids == image_id).sum())
    assert n_image == int(enc.image_grid_thw.prod()) // 4 == int(enc.mm_token_type_ids.sum())
    assert enc.pixel_values.shape[0] == int(enc.image_grid_thw.prod())
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    blind = enc.prefix(with_images=False)  # the reference's image-blind layout: pads for pixels
    assert image_id not in blind.input_ids.tolist()
    expected = torch.where(enc.input_ids == image_id, pad, enc.input_ids)
    assert torch.equal(blind.input_ids, expected)
    assert blind.pixel_values is None and int(blind.mm_token_type_ids.sum()) == 0


def test_encode_prompts_drops_overlong(processor, caplog):
    examples = synthetic_dataset("train", size=4, kinds=VISUAL_KINDS)  # four prompt lengths
    lengths = [encode_prompt(processor, e).input_ids.numel() for e in examples[:4]]
    assert len(set(lengths)) > 1
    limit = sorted(lengths)[1]
    with caplog.at_level(logging.WARNING, logger="cepo.data"):
        kept, dropped = encode_prompts(processor, examples[:4], max_prompt_tokens=limit)
    assert dropped == sum(n > limit for n in lengths) and len(kept) == 4 - dropped
    assert all(p.input_ids.numel() <= limit for p in kept)
    assert f"dropped {dropped} prompt(s)" in caplog.text


# --------------------------------------------------------------------------- Geo3k loading


def _geo_rows():
    good = _png()
    return [
        {"images": [{"bytes": good, "path": None}], "problem": "<image>Find x.", "answer": "3"},
        {
            "images": [{"bytes": b"not an image", "path": None}],
            "problem": "<image>A",
            "answer": "1",
        },
        {"images": [{"bytes": good, "path": None}], "problem": "<image>B", "answer": ""},
        {"images": [], "problem": "<image>C", "answer": "2"},
        {"images": [{"bytes": good, "path": None}], "problem": "<image>Find y.", "answer": "2.5"},
    ]


def test_parquet_rows_are_skipped_with_counts(tmp_path, caplog):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_geo_rows()), path)
    with caplog.at_level(logging.WARNING, logger="cepo.data"):
        examples = load_geo3k(str(path))
    assert [(e.problem, e.answer) for e in examples] == [
        ("<image>Find x.", "3"),
        ("<image>Find y.", "2.5"),
    ]
    assert examples[0].images[0].size == (20, 10) and examples[0].images[0].mode == "RGB"
    assert "skipped 3 (bad image: 1, missing answer: 1, missing image: 1)" in caplog.text


def test_hub_snapshot_directory_picks_the_split(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "data").mkdir()
    rows = _geo_rows()
    pq.write_table(
        pa.Table.from_pylist(rows[:1]), tmp_path / "data" / "train-00000-of-00001.parquet"
    )
    pq.write_table(
        pa.Table.from_pylist(rows[4:]), tmp_path / "data" / "test-00000-of-00001.parquet"
    )
    assert [e.answer for e in load_geo3k(str(tmp_path), "train")] == ["3"]
    assert [e.answer for e in load_geo3k(str(tmp_path), "test")] == ["2.5"]
    with pytest.raises(FileNotFoundError, match="validation"):
        load_geo3k(str(tmp_path), "validation")


def test_jsonl_with_image_paths(tmp_path):
    Image.new("RGB", (6, 6), "blue").save(tmp_path / "a.png")
    lines = [
        {"images": ["a.png"], "problem": "<image>Q1", "answer": "1"},
        {"images": ["missing.png"], "problem": "<image>Q2", "answer": "2"},
        {"problem": "No picture here.", "answer": "\\frac{1}{2}"},
        {"problem": "A number answer.", "answer": 0.25},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    examples = load_geo3k(str(path))
    assert [e.answer for e in examples] == ["1", "\\frac{1}{2}", "0.25"]
    assert examples[0].images[0].getpixel((0, 0)) == (0, 0, 255) and examples[1].images == ()


def test_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _geo_rows()
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:1]),
            "test": datasets.Dataset.from_list(rows[4:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "geo"))
    assert [e.answer for e in load_geo3k(str(tmp_path / "geo"), "test")] == ["2.5"]
    with pytest.raises(KeyError, match="no split 'val'"):
        load_geo3k(str(tmp_path / "geo"), "val")


def test_no_usable_rows_is_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"images": [], "problem": "<image>Q", "answer": "1"}))
    with pytest.raises(ValueError, match=r"no usable rows .*missing image: 1"):
        load_geo3k(str(path))


def test_missing_field_names_it(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "Q", "answer": "1"}))
    with pytest.raises(KeyError, match=r"lacks field\(s\) \['problem'\]"):
        load_geo3k(str(path))


def test_unreachable_hub_says_so(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="could not be loaded from the hub"):
        load_geo3k("hiyouga/geometry3k")
    with pytest.raises(FileNotFoundError, match="neither a file"):
        load_geo3k("./does-not-exist")


def test_decode_image_forms(tmp_path):
    png = _png("green")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    for item in (png, {"bytes": png}, uri, Image.open(io.BytesIO(png))):
        image = sources.decode_image(item, tmp_path)
        assert image is not None and image.getpixel((0, 0)) == (0, 128, 0)
    assert sources.decode_image(b"garbage", None) is None
    assert sources.decode_image(42, None) is None


# --------------------------------------------------------------------------- bad rows


def _uri(size=(20, 10)) -> str:
    return "data:image/png;base64," + base64.b64encode(_png("red", size)).decode()


def _load_jsonl(tmp_path, rows, caplog, **kwargs):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING, logger="cepo.data"):
        return load_geo3k(str(path), **kwargs)


def test_answers_that_are_not_text_or_a_finite_number_are_skipped_and_counted(tmp_path, caplog):
    answers = [float("nan"), float("inf"), [1, 2], {"x": 1}, True, None, 3, 2.5, " 7 ", "x"]
    rows = [{"problem": f"Q{i}", "answer": a} for i, a in enumerate(answers)]
    examples = _load_jsonl(tmp_path, rows, caplog)
    assert [(e.problem, e.answer) for e in examples] == [
        ("Q6", "3"), ("Q7", "2.5"), ("Q8", "7"), ("Q9", "x")]
    assert ("skipped 6 (answer not a finite number: 2, answer not text (bool): 1, answer not "
            "text (dict): 1, answer not text (list): 1, missing answer: 1)") in caplog.text


def _bad_rows() -> list[tuple[dict, str]]:
    """Rows that load as data but would crash the step that samples them, with the reason."""
    return [
        ({"images": [_uri((1, 201))], "problem": "<image>Q", "answer": "1"},
         "image aspect ratio over 200"),
        ({"images": [_uri((401, 2))], "problem": "<image>Q", "answer": "1"},
         "image aspect ratio over 200"),
        ({"images": [_uri()], "problem": "<image>Q \ud800", "answer": "1"},
         "text not valid Unicode (lone surrogate)"),
        ({"images": [_uri()], "problem": "<image>Q", "answer": "\udc80"},
         "text not valid Unicode (lone surrogate)"),
    ]


def _good_rows() -> list[dict]:
    return [{"images": [_uri(size)], "problem": "<image>Q", "answer": "1"}
            for size in ((1, 200), (400, 2), (1, 1), (20, 10))]


def test_rows_the_processor_would_refuse_are_skipped_at_load(tmp_path, caplog):
    bad = _bad_rows()
    examples = _load_jsonl(tmp_path, [row for row, _ in bad] + _good_rows(), caplog)
    assert [e.images[0].size for e in examples] == [(1, 200), (400, 2), (1, 1), (20, 10)]
    assert ("skipped 4 (image aspect ratio over 200: 2, text not valid Unicode (lone "
            "surrogate): 2)") in caplog.text


def test_skipped_rows_are_exactly_those_the_real_processor_refuses(processor, tmp_path):
    """The load-time checks mirror the processor: it raises on every skipped row (the image
    processor, the tokenizer on the problem, or on the answer as the teachers' hint) and accepts
    every kept one."""

    def encodes(row: dict) -> bool:
        images = tuple(sources.decode_image(item, tmp_path) for item in row["images"])
        example = Example(row["problem"], row["answer"], images)
        try:
            encode_prompt(processor, example)
            processor.tokenizer(example.answer)
            return True
        except (ValueError, TypeError):
            return False

    assert [encodes(row) for row, _ in _bad_rows()] == [False] * 4
    assert [encodes(row) for row in _good_rows()] == [True] * 4


def test_with_a_processor_every_prompt_is_encoded_at_load(processor, tmp_path, caplog):
    rows = [{"images": [_uri()], "problem": "<image>Q <|image_pad|>", "answer": "1"},
            {"images": [_uri()], "problem": "<image>Fine.", "answer": "2"}]
    assert len(_load_jsonl(tmp_path, rows, caplog)) == 2  # the cheap checks pass both
    caplog.clear()
    examples = _load_jsonl(tmp_path, rows, caplog, processor=processor)
    assert [e.answer for e in examples] == ["2"]
    assert "skipped 1 (prompt refused by the processor (ValueError): 1)" in caplog.text
    assert load_split(str(tmp_path / "rows.jsonl"), processor=processor, limit=1)[0].answer == "2"


def test_decompression_bombs_and_undecodable_bytes_skip_the_row(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL: warns above 1x, raises above 2x
    rows = [{"images": [_uri((100, 100))], "problem": "<image>A", "answer": "1"},  # 10,000 px
            {"images": [_uri((40, 40))], "problem": "<image>B", "answer": "2"},  # 1,600 px
            {"images": [{"bytes": "not bytes"}], "problem": "<image>C", "answer": "3"},
            {"images": [{"bytes": [1, 2]}], "problem": "<image>D", "answer": "4"},
            {"images": [_uri((30, 30))], "problem": "<image>E", "answer": "5"}]
    examples = _load_jsonl(tmp_path, rows, caplog)
    assert [e.answer for e in examples] == ["5"]
    assert "skipped 4 (bad image: 2, image too large (decompression bomb): 2)" in caplog.text


@pytest.mark.parametrize("name, text, where", [
    ("rows.jsonl", '{"problem": "Q", "answer": "1"}\n\n{"problem": oops}\n', "rows.jsonl, line 3"),
    ("rows.jsonl", '{"problem": "Q", "answer": "1"}\n[1, 2]\n', "rows.jsonl, line 2: a row must"),
    ("rows.json", '[\n {"problem": "Q", "answer": "1"},\n {oops}\n]', "rows.json, line 3"),
    ("rows.json", '[{"problem": "Q", "answer": "1"}, 5]', "rows.json, item 1: a row must"),
])
def test_a_file_that_is_not_rows_names_the_file_and_line(tmp_path, name, text, where):
    from cepo.errors import DataError

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match="not JSON|a row must") as err:
        load_geo3k(str(path))
    assert str(err.value).startswith(str(tmp_path / where)), str(err.value)
