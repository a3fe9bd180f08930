"""Two CPU processes (torchrun, gloo): DDP, and FSDP (`--sharding fsdp`) checked against DDP.

The same seeds give both layouts the same rollouts and the same averaged gradients, so an FSDP
run must reproduce the DDP run's metrics, weights and AdamW state; and since checkpoints are
saved whole, a run saved under one layout resumes under the other to the same next step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cepo.train as train_module
from cepo import checkpoint as ckpt
from cepo.metrics import read
from tests.cepo.test_train import VOLATILE, train_args

ROOT = Path(__file__).resolve().parents[2]


def torchrun(warm_dir: str, out: Path, **extra) -> str:
    """`python -m cepo.train` on 2 processes; returns its output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cepo.train", *train_args(warm_dir, str(out), **extra)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


# full fine-tuning, one step, of the tiny model with tied embeddings as Qwen3-VL-2B/4B have them,
# with gradient checkpointing as the GPU configs use it
FULL = {"algo": "grpo", "lora.enabled": False, "steps": 1, "val.every": 0,
        "val.before_train": False, "model.gradient_checkpointing": True}
SETUPS = {
    "lora": {},
    "full": FULL,
    "full-bf16": {**FULL, "model.dtype": "float32", "mixed_precision": "bf16"},
}


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tiny_dir) -> str:
    """The tiny model with lm_head tied to the input embeddings, then warmed up like warm_dir
    (so that its groups mix right and wrong answers and the update has gradients)."""
    from cepo.models import load_model, load_processor, save_processor_files
    from cepo.offline.warmup import WarmupConfig, build_warm_tiny

    model = load_model(tiny_dir, device="cpu", dtype=torch.float32)
    for config in (model.config, model.config.text_config):
        config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    root = tmp_path_factory.mktemp("tied")
    model.save_pretrained(root / "random")
    save_processor_files(load_processor(tiny_dir), tiny_dir, root / "random")
    warm = build_warm_tiny(root / "warm", WarmupConfig(steps=150), base=root / "random")
    assert "lm_head.weight" not in load_file(warm / "model.safetensors")
    return str(warm)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, warm_dir, tied_dir):
    """(sharding, setup) -> run directory of a finished 2-process run, each trained once."""
    done = {}

    def get(sharding: str, setup: str = "lora") -> Path:
        if (sharding, setup) not in done:
            out = tmp_path_factory.mktemp(f"{sharding}-{setup}")
            model = tied_dir if setup.startswith("full") else warm_dir
            # prefix sharing on in both layouts (auto leaves it off under fsdp): the shared
            # update must give FSDP across processes the same step as DDP
            text = torchrun(model, out, sharding=sharding, prefix_sharing="true",
                            **SETUPS[setup])
            assert "x2:" in text  # "cepo on cpu:0 x2: ..."
            done[sharding, setup] = out
        return done[sharding, setup]

    return get


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if not key.startswith((*VOLATILE, "memory/")):  # memory: compared below
                # fp32 sums in another order (two layouts, two processes): Δ means near 0 and
                # log-ratio extremes move by up to ~2e-5 relative or a few 1e-7; the wrong-way
                # shares count signs of Δ, which is near 0 on tokens both teachers are sure of
                # (|Δ| < 1e-3 on 2/3 of the offline run's): a few of ~80 may flip sign
                # (measured with prefix sharing: 5 of 75 at step 2, weights within 1.2e-7)
                tol = 0.1 if key.startswith("cepo/frac_wrong_dir") else 1e-6
                assert rb[key] == pytest.approx(value, rel=1e-4, abs=tol), (ra["step"], key)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        # AdamW divides by sqrt(v): on a weight whose gradient is near 0, another summation
        # order moves it by a few 1e-6 after two steps (measured: 2.6e-6 on 1 of 1024)
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, key=key: f"{key}: {m}")


def assert_same_optimizer(a: Path, b: Path) -> None:
    sa, sb = ckpt.load_optimizer(a), ckpt.load_optimizer(b)
    assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for name in sa["state"]:
        assert_same_tensors(sa["state"][name], sb["state"][name])


def test_ddp_two_processes(two_process_runs):
    """Each process rolls out whole groups of its own prompts; both save their RNG."""
    out = two_process_runs("none")
    latest = ckpt.latest_checkpoint(out)
    state = ckpt.read_state(latest)
    assert state["world_size"] == 2 and state["sharding"] == "none"
    assert (latest / "rng" / "rank-0.pt").is_file() and (latest / "rng" / "rank-1.pt").is_file()
    records = read(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["rollout/mixed_groups"] > 0 and records[2]["val/examples"] == 8


def test_fsdp_lora_matches_ddp(two_process_runs):
    ddp, fsdp = two_process_runs("none"), two_process_runs("fsdp")
    assert ckpt.read_state(ckpt.latest_checkpoint(fsdp))["sharding"] == "fsdp"
    assert_same_metrics(read(ddp / "metrics.jsonl"), read(fsdp / "metrics.jsonl"))
    a, b = ckpt.latest_checkpoint(ddp), ckpt.latest_checkpoint(fsdp)
    assert_same_tensors(load_file(a / "adapter_model.safetensors"),
                        load_file(b / "adapter_model.safetensors"))
    assert_same_optimizer(a, b)
    # and training moved the adapters away from their initial values (lora_B starts at 0)
    assert any(v.abs().max() > 0 for k, v in load_file(b / "adapter_model.safetensors").items()
               if "lora_B" in k)


def test_fsdp_full_finetuning_matches_ddp(two_process_runs):
    """Full fine-tuning puts trainable weights in the root unit (the tied embeddings / lm_head,
    the final norm); the saved model leaves the tied lm_head out, as save_pretrained does."""
    ddp, fsdp = two_process_runs("none", "full"), two_process_runs("fsdp", "full")
    records = read(fsdp / "metrics.jsonl")
    assert records[0]["rollout/mixed_groups"] > 0 and records[0]["ppo/grad_norm"] > 0
    assert_same_metrics(read(ddp / "metrics.jsonl"), records)
    a, b = ckpt.latest_checkpoint(ddp), ckpt.latest_checkpoint(fsdp)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert_same_tensors(wa, wb)
    assert_same_optimizer(a, b)
    assert any("embed_tokens" in name for name in ckpt.load_optimizer(b)["state"])
    # each FSDP process holds about half the weights and AdamW state of a DDP replica
    whole, shard = read(ddp / "metrics.jsonl")[0], records[0]
    for key in ("memory/params_gib_max", "memory/optimizer_gib_max"):
        assert 0.45 < shard[key] / whole[key] < 0.6, (key, shard[key], whole[key])
    assert "lm_head.weight" not in wb


def test_fsdp_bf16_compute_keeps_fp32_weights_and_adamw(two_process_runs, tied_dir):
    """fp32 model + --mixed_precision bf16: bf16 gathers and forwards, fp32 shards and AdamW."""
    out = two_process_runs("fsdp", "full-bf16")
    latest = ckpt.latest_checkpoint(out)
    weights = load_file(latest / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    state = ckpt.load_optimizer(latest)["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.float32}
    step = read(out / "metrics.jsonl")[0]
    assert step["rollout/mixed_groups"] > 0 and 0 < step["ppo/grad_norm"] < 1e3
    base = load_file(Path(tied_dir) / "model.safetensors")
    moved = [k for k in weights if "layers" in k and not torch.equal(weights[k], base[k])]
    assert moved  # the update reached the fp32 shards


def test_resume_across_layouts(tmp_path, two_process_runs, warm_dir):
    """A DDP checkpoint resumed under FSDP and an FSDP one under DDP give the same step 3."""
    ddp, fsdp = tmp_path / "ddp-then-fsdp", tmp_path / "fsdp-then-ddp"
    shutil.copytree(two_process_runs("none"), ddp)
    shutil.copytree(two_process_runs("fsdp"), fsdp)
    torchrun(warm_dir, ddp, steps=3, resume=True, sharding="fsdp")
    torchrun(warm_dir, fsdp, steps=3, resume=True, sharding="none")
    a, b = read(ddp / "metrics.jsonl"), read(fsdp / "metrics.jsonl")
    assert [r["step"] for r in a] == [0, 1, 2, 3]
    assert_same_metrics(a, b)
    assert a[3]["cepo/lambda"] == pytest.approx(0.5 * (1 - 2 / 25))  # λ continues
    assert_same_tensors(load_file(ckpt.latest_checkpoint(ddp) / "adapter_model.safetensors"),
                        load_file(ckpt.latest_checkpoint(fsdp) / "adapter_model.safetensors"))


def test_fsdp_needs_several_processes(warm_dir, tmp_path):
    with pytest.raises(SystemExit, match="at least 2 processes"):
        train_module.main(train_args(warm_dir, str(tmp_path / "one"), sharding="fsdp"))


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP"])
def test_other_launchers_are_refused_with_advice(monkeypatch, kind):
    """accelerate's DeepSpeed / FSDP plugins would wrap the model behind the trainer's back."""
    import accelerate
    from accelerate.utils import DistributedType

    from cepo.config import build_config

    class Launched:
        def __init__(self, **kwargs):
            self.distributed_type, self.num_processes = DistributedType[kind], 8

    monkeypatch.setattr(accelerate, "Accelerator", Launched)
    with pytest.raises(SystemExit, match=f"distributed_type={kind} is not supported.*--sharding"):
        train_module.make_accelerator(build_config(["--device", "cpu"]))
