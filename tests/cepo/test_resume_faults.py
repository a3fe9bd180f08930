"""`kill -9` at named moments of a step, then `--resume`: the run ends with the records and
weights of an uninterrupted run. The trainer runs as a subprocess and kills itself (SIGKILL) at
``CEPO_FAULT_AT=point:step`` (cepo.rundir.fault_point)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cepo import checkpoint as ckpt
from cepo.metrics import read

from .test_train import VOLATILE, train_args

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"steps": 3, "checkpoint.every": 1, "checkpoint.keep_last": 1, "val.every": 2,
            "val.before_train": False, "data.val_limit": 4, "ppo.shuffle": True}


def run_trainer(warm_dir: str, out: Path, *, fault: str | None = None, resume: bool = False):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CEPO_FAULT_AT", None)
    if fault:
        env["CEPO_FAULT_AT"] = fault
    args = train_args(warm_dir, str(out), **SETTINGS, **({"resume": True} if resume else {}))
    done = subprocess.run([sys.executable, "-m", "cepo.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if fault:
        assert done.returncode == -signal.SIGKILL, (fault, done.returncode, done.stderr[-3000:])
    else:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for ra, rb in zip(a, b, strict=True):
        keys = {k for k in ra if not k.startswith(VOLATILE)}
        assert keys == {k for k in rb if not k.startswith(VOLATILE)}, ra["step"]
        for key in keys:
            if isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
            else:
                assert rb[key] == ra[key], (ra["step"], key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, warm_dir) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    run_trainer(warm_dir, out)
    return out


def test_kill_9_at_every_moment_of_a_step_then_resume(straight, warm_dir, tmp_path):
    out = tmp_path / "run"
    # each kill, then a resume that is killed at the next point; one point per commit phase
    run_trainer(warm_dir, out, fault="after_commit:1")  # committed, records already out
    assert [r["step"] for r in read(out / "metrics.jsonl")] == [1]
    run_trainer(warm_dir, out, fault="mid_save:2", resume=True)  # weights half written
    run_trainer(warm_dir, out, fault="after_records:2", resume=True)  # records, no commit
    assert [r["step"] for r in read(out / "metrics.jsonl")] == [1, 2]
    run_trainer(warm_dir, out, fault="mid_commit:2", resume=True)  # renamed, latest not moved
    assert (out / "checkpoints" / "latest").read_text() == "step-000001"
    # a record torn by the kill (or a full disk) at the end of both files
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"step": 3, "reward/me')
    done = run_trainer(warm_dir, out, fault="before_records:3", resume=True)
    assert "torn last record" in done.stderr
    run_trainer(warm_dir, out, resume=True)

    assert_same_records(read(straight / "metrics.jsonl"), read(out / "metrics.jsonl"))
    sa, sb = read(straight / "samples.jsonl"), read(out / "samples.jsonl")
    assert [(r["step"], r["response"]) for r in sb] == [(r["step"], r["response"]) for r in sa]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000003"]
    from safetensors.torch import load_file

    wa = load_file(ckpt.resume_point(straight) / "adapter_model.safetensors")
    wb = load_file(ckpt.resume_point(out) / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=1e-5)
