"""``python -m cepo.eval`` on a merged run folder, and one-line messages for what is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cepo import config as C


@pytest.fixture
def offline(monkeypatch):
    """No hub: what a machine without network (or with HF_HUB_OFFLINE=1) sees."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _merged(tiny_dir, tmp_path, **overrides):
    """A folder as `python -m cepo.lora` leaves it: a full model, its processor files and the
    run's config as cepo_config.yaml."""
    merged = tmp_path / "merged"
    shutil.copytree(tiny_dir, merged)
    cfg = C.apply_overrides(C.paper(), overrides)
    C.save_yaml(C.finalize(cfg), merged / "cepo_config.yaml")
    return merged


def _eval_error(argv) -> str:
    from cepo.eval import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_a_merged_folder_is_scored_on_its_runs_data(tiny_dir, tmp_path, offline):
    from cepo.eval import main

    merged = _merged(tiny_dir, tmp_path, **{"data.train": "synthetic", "data.val_split": "val",
                                            "rollout.max_new_tokens": 4})
    result = main(["--model", str(merged), "--limit", "2", "--batch_size", "2",
                   "--device", "cpu"])
    assert (result["source"], result["split"], result["val/examples"]) == ("synthetic", "val", 2)
    assert result["val/response_length"] <= 4  # the run's rollout limit, from its config


def test_a_merged_folder_whose_data_set_is_not_here_says_what_to_pass(tiny_dir, tmp_path,
                                                                       offline):
    merged = _merged(tiny_dir, tmp_path)  # the paper run: hiyouga/geometry3k from the hub
    message = _eval_error(["--model", str(merged), "--device", "cpu"])
    assert message.startswith("not available: data set 'hiyouga/geometry3k' is not a local "
                              "path and could not be loaded from the hub (offline?"), message
    assert "--data" in message and "synthetic" in message


def test_a_hub_model_offline_says_what_to_pass(offline):
    message = _eval_error(["--model", "Qwen/Qwen3-VL-2B-Instruct", "--data", "synthetic"])
    assert message.startswith("not available: model 'Qwen/Qwen3-VL-2B-Instruct' is not a local "
                              "directory and could not be loaded from the hub (offline?"), message
    assert "huggingface-cli download Qwen/Qwen3-VL-2B-Instruct" in message


def test_the_paper_configs_model_offline_is_one_line_for_the_trainer_too(offline):
    """`python -m cepo.train --config configs/paper_2b.yaml` offline: set-up loads the processor
    first, and it raises this error (the trainer prints it as one line)."""
    from cepo.errors import NotAvailable, UserError
    from cepo.models import load_model, load_processor

    cfg = C.build_config(["--config", str(Path(__file__).resolve().parents[2] / "configs" /
                                          "paper_2b.yaml")])
    for load in (load_processor, load_model):
        with pytest.raises(NotAvailable, match=r"model 'Qwen/Qwen3-VL-2B-Instruct' is not a "
                                               r"local directory .* pass its directory") as err:
            load(cfg.model.name)
        assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_missing_checkpoint_and_missing_split_are_one_line(tiny_dir, tmp_path, offline):
    message = _eval_error(["--checkpoint", str(tmp_path / "no-run")])
    assert message.startswith(f"error: {tmp_path / 'no-run'}: no checkpoint") and (
        "pass a run directory" in message)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"problem": "Q", "answer": "1"}\n')
    message = _eval_error(["--model", tiny_dir, "--data", str(tmp_path / "data"),
                           "--split", "test"])
    assert "no *test*.parquet" in message and "--data synthetic" in message
