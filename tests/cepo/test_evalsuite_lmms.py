"""The lmms-eval path of the paper suite, without running lmms-eval: the command (tasks,
generation settings, merged-model path) is asserted and its samples files are faked."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cepo.evalsuite import lmms
from cepo.evalsuite.benchmarks import BENCHMARKS

TASKS = ["dynamath_reasoning", "logicvista_reasoning", "mathvision_testmini", "mmmu_val",
         "wemath_testmini_reasoning"]


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, tiny_dir):
    """A LoRA checkpoint of the tiny model, saved the way the trainer saves one."""
    from cepo.config import ModelConfig, TrainConfig, finalize, save_yaml
    from cepo.lora import apply_lora
    from cepo.models import load_model

    from cepo import checkpoint as ckpt

    cfg = finalize(TrainConfig(model=ModelConfig(name=tiny_dir)))
    run_dir = tmp_path_factory.mktemp("run")
    staging = ckpt.begin(run_dir, 2)
    apply_lora(load_model(tiny_dir, device="cpu"), cfg.lora).save_pretrained(staging)
    save_yaml(cfg, staging / "config.yaml")
    return ckpt.commit(run_dir, 2, {}, keep_last=2)  # checksummed, as the trainer commits


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _kv(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(","))


# doc_id -> (logged metric fields, expected score) per task, in lmms-eval's samples format
LOGGED = {
    "dynamath_reasoning": [({"dynamath_average": {"acc": 1.0, "question_id": "1"}}, 1.0),
                           ({"dynamath_average": {"acc": 0.0, "question_id": "2"}}, 0.0)],
    "logicvista_reasoning": [({"acc_score": 1.0, "format_score": 1.0}, 1.0),
                             ({"acc_score": 0.0, "format_score": 0.8}, 0.0)],
    "mathvision_testmini": [({"mathvision_standard_eval": {"scores": [True]}}, 1.0),
                            ({"mathvision_standard_eval": {"scores": [False]}}, 0.0)],
    "mmmu_val": [({"mmmu_acc": {"answer": "B", "parsed_pred": ["B"],
                                "question_type": "multiple-choice"}}, 1.0),
                 # lmms-eval compares a list-literal answer as one string: no match here
                 ({"mmmu_acc": {"answer": "['0.5', '1/2']", "parsed_pred": [["0.5", 0.5]],
                                "question_type": "open"}}, 0.0),
                 ({"mmmu_acc": {"answer": "0.5", "parsed_pred": [["x", 0.5]],
                                "question_type": "open"}}, 1.0),
                 ({"mmmu_acc": {"answer": "12", "parsed_pred": [[13.0]],
                                "question_type": "open"}}, 0.0)],
    "wemath_testmini_reasoning": [({"acc_score": 0.0, "wemath_loose": {}}, 0.0)],
}


class FakeLmmsEval:
    """Stands in for `subprocess.run`: records each command, writes lmms-eval's samples files."""

    def __init__(self, flip_sample: int | None = None):
        self.commands: list[list[str]] = []
        self.flip_sample = flip_sample  # this sample's run gets every score flipped

    def __call__(self, cmd, check=False):
        self.commands.append(cmd)
        sample = len(self.commands) - 1
        out = Path(_flag(cmd, "--output_path")) / "some__model"
        out.mkdir(parents=True)
        for task in _flag(cmd, "--tasks").split(","):
            lines = []
            for doc_id, (fields, score) in enumerate(LOGGED[task]):
                if sample == self.flip_sample:
                    fields = {"acc_score": 1.0 - score, "dynamath_average": {"acc": 1.0 - score},
                              "mathvision_standard_eval": {"scores": [score == 0]},
                              "mmmu_acc": {"answer": "A", "parsed_pred": ["B" if score else "A"],
                                           "question_type": "multiple-choice"}}
                lines.append(json.dumps({"doc_id": doc_id, "target": "x", "resps": [["..."]],
                                         "filtered_resps": ["..."], **fields}))
            (out / f"20260101_samples_{task}.jsonl").write_text("\n".join(lines) + "\n")
        return subprocess.CompletedProcess(cmd, 0)


def test_command_carries_the_papers_settings(tmp_path):
    cmd = lmms.build_command("/models/merged", tmp_path, BENCHMARKS,
                             settings=lmms.SamplingSettings(), seed=3)
    assert cmd[1:5] == ["-m", "lmms_eval", "--model", "vllm"]
    assert _flag(cmd, "--tasks").split(",") == TASKS
    assert _kv(_flag(cmd, "--model_args")) == {
        "model": "/models/merged", "dtype": "bfloat16", "max_model_len": "40000",
        "max_new_tokens": "32000", "tensor_parallel_size": "1", "gpu_memory_utilization": "0.85"}
    assert _kv(_flag(cmd, "--gen_kwargs")) == {
        "temperature": "1.0", "top_p": "1.0", "top_k": "40", "presence_penalty": "2.0",
        "max_new_tokens": "32000", "seed": "3"}
    assert "--log_samples" in cmd and _flag(cmd, "--output_path") == str(tmp_path)
    with pytest.raises(ValueError, match="contains ',' or '='"):
        lmms.build_command("/a,b", tmp_path, BENCHMARKS, settings=lmms.SamplingSettings(), seed=0)


def test_suite_merges_the_adapter_and_runs_lmms_eval_per_sample(lora_checkpoint, monkeypatch):
    from cepo.eval import main

    fake = FakeLmmsEval(flip_sample=1)
    monkeypatch.setattr(lmms, "check_installed", lambda: None)
    monkeypatch.setattr(lmms.subprocess, "run", fake)
    summary = main(["--suite", "paper", "--checkpoint", str(lora_checkpoint), "--samples", "2",
                    "--seed", "5"])
    out = lora_checkpoint / "eval-paper"
    merged = out / "merged-model"
    assert (merged / "config.json").is_file() and (merged / "cepo_config.yaml").is_file()
    assert len(fake.commands) == 2
    for j, cmd in enumerate(fake.commands):
        assert _kv(_flag(cmd, "--model_args"))["model"] == str(merged)
        assert _kv(_flag(cmd, "--gen_kwargs"))["seed"] == str(5 + j)
        assert _flag(cmd, "--tasks").split(",") == TASKS
        assert _flag(cmd, "--output_path") == str(out / "lmms-eval" / f"sample-{j}")
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "lmms-eval" and results["served_model"] == str(merged)
    for bench in BENCHMARKS:
        want = {str(i): [s, 1.0 - s] for i, (_, s) in enumerate(LOGGED[bench.task])}
        assert results["benchmarks"][bench.key]["scores"] == want, bench.key
        assert summary[bench.key]["mean"] == pytest.approx(50.0)  # each sample flips the other
    assert (out / "table.md").is_file()


def test_a_full_model_checkpoint_is_served_as_is(tmp_path, monkeypatch):
    from cepo.config import TrainConfig, finalize, save_yaml
    from cepo.eval import main

    from cepo import checkpoint

    staging = checkpoint.begin(tmp_path, 1)
    save_yaml(finalize(TrainConfig()), staging / "config.yaml")
    ckpt = checkpoint.commit(tmp_path, 1, {}, keep_last=2)
    fake = FakeLmmsEval()
    monkeypatch.setattr(lmms, "check_installed", lambda: None)
    monkeypatch.setattr(lmms.subprocess, "run", fake)
    main(["--suite", "paper", "--checkpoint", str(ckpt), "--benchmarks", "mmmu", "--limit", "3"])
    (cmd,) = fake.commands
    assert _kv(_flag(cmd, "--model_args"))["model"] == str(ckpt)
    assert _flag(cmd, "--tasks") == "mmmu_val" and _flag(cmd, "--limit") == "3"
    table = (ckpt / "eval-paper" / "table.md").read_text()
    assert "paper 2B CEPO" in table  # the config's base model is Qwen3-VL-2B


def test_missing_lmms_eval_is_a_clear_error_before_any_work(lora_checkpoint, monkeypatch):
    from cepo.eval import main

    monkeypatch.setattr(lmms.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"not installed.*--data-dir DIR"):
        main(["--suite", "paper", "--checkpoint", str(lora_checkpoint), "--output",
              str(lora_checkpoint.parent / "elsewhere")])
    assert not (lora_checkpoint.parent / "elsewhere").exists()  # nothing merged


def test_a_failed_lmms_eval_run_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(lmms.subprocess, "run",
                        lambda cmd, check=False: subprocess.CompletedProcess(cmd, 2))
    with pytest.raises(RuntimeError, match="lmms-eval exited with status 2 on sample 0"):
        lmms.run("m", tmp_path, BENCHMARKS, samples=1, seed=0, settings=lmms.SamplingSettings())


def test_a_samples_line_without_its_score_names_file_and_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x_samples_mmmu_val.jsonl").write_text('{"doc_id": 0}\n')
    with pytest.raises(ValueError, match=r"samples_mmmu_val.jsonl line 1: no per-question score"):
        lmms.read_samples(tmp_path, BENCHMARKS[3])


@pytest.mark.parametrize("gold,pred,qtype,want", [
    ("B", "B", "multiple-choice", True), ("B", "C", "multiple-choice", False),
    ("12", [12.0], "open", True), ("12", [12.5], "open", False),
    ("1,000", [1000.0], "open", True), ("Paris", ["the city is paris"], "open", True),
    ("a", ["banana"], "open", False), (["x", "7"], [7.0], "open", True),
])
def test_mmmu_rule(gold, pred, qtype, want):
    assert lmms.mmmu_correct(gold, pred, qtype) is want


def test_native_suite_on_a_lora_checkpoint_and_compare_by_run_dir(lora_checkpoint, tmp_path):
    """--data-dir scores the checkpoint's adapted policy natively into eval-paper-native/;
    --compare finds that file from the run directory."""
    from cepo.eval import main
    from tests.cepo.evalsuite_fixtures import write_benchmarks

    data = write_benchmarks(tmp_path / "bench")
    main(["--suite", "paper", "--checkpoint", str(lora_checkpoint), "--data-dir", str(data),
          "--benchmarks", "wemath", "mmmu", "--max_new_tokens", "2", "--device", "cpu"])
    path = lora_checkpoint / "eval-paper-native" / "results.json"
    results = json.loads(path.read_text())
    assert results["backend"] == "native" and sorted(results["benchmarks"]) == ["mmmu", "wemath"]
    assert results["checkpoint"] == str(lora_checkpoint)
    run_dir = lora_checkpoint.parent.parent
    if (lora_checkpoint / "eval-paper" / "results.json").is_file():  # the lmms-eval test's
        with pytest.raises(ValueError, match="several suite results"):
            main(["--compare", str(run_dir), str(path)])
        (lora_checkpoint / "eval-paper" / "results.json").unlink()
    diff = main(["--compare", str(run_dir), str(path)])
    assert diff["average"]["mean"] == 0.0
