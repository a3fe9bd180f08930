"""`python -m cepo.train`: a model or data that cannot be used is one line, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _main_error(argv) -> str:
    from cepo.train import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code)
    assert "\n" not in message, message
    return message


def test_the_paper_config_offline_says_what_to_pass(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = _main_error(["--config", str(CONFIGS / "paper_2b.yaml"),
                           "--output_dir", str(tmp_path / "run")])
    assert message.startswith("not available: model 'Qwen/Qwen3-VL-2B-Instruct' is not a local "
                              "directory"), message


def test_a_data_line_that_is_not_json_names_file_and_line(tmp_path, tiny_dir):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"problem": "Q", "answer": "1"}) + "\n{oops\n")
    message = _main_error(["--model.name", tiny_dir, "--data.train", str(path),
                           "--output_dir", str(tmp_path / "run")])
    assert message.startswith(f"data error: {path}, line 2: not JSON"), message
