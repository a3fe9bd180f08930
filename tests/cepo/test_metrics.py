"""Run logging: the JSON-lines file (truncated on resume), TensorBoard and W&B (read back with
their own readers), reductions, CEPO weight statistics."""

from __future__ import annotations

import json
import math
import struct
import sys

import numpy as np
import pytest
import torch

from cepo.diagnostics import diagnostic_sums, diagnostics_from_sums, token_diagnostics
from cepo.metrics import MetricsWriter, read, reduce_across, summarize


def test_jsonl_writer_and_resume_truncation(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(4):
        writer.log(step, {"reward/mean": step / 10, "x": torch.tensor(1.5), "bad": math.nan})
    assert [r["step"] for r in read(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert read(tmp_path / "metrics.jsonl")[1] == {"step": 1, "reward/mean": 0.1, "x": 1.5,
                                                   "bad": None}
    resumed = MetricsWriter(tmp_path, resume_step=2)  # steps 3+ are re-done after a resume
    assert [r["step"] for r in resumed.history] == [0, 1, 2]
    resumed.log(3, {"reward/mean": 0.9})
    assert [r["step"] for r in read(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert MetricsWriter(tmp_path / "other", enabled=False).history == []
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.jsonl"])
def test_a_torn_last_record_is_dropped_on_resume(tmp_path, caplog, name):
    """A crash or a full disk mid-write leaves half a line: resume drops it with a warning (it
    used to stop with a bare JSONDecodeError); a bad line before the end names file and line."""
    import logging

    from cepo.samples import SampleWriter

    path = tmp_path / name
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    with caplog.at_level(logging.WARNING):
        if name == "metrics.jsonl":
            assert [r["step"] for r in MetricsWriter(tmp_path, resume_step=3).history] == [1, 2]
        else:
            SampleWriter(tmp_path, 2, resume_step=3)
    assert f"{path}:3: torn last record" in caplog.text
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'  # repaired
    path.write_text('{"step": 1}\n{"step": 2, "a\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a JSON record"):
        read(path)


def test_optional_backends_are_skipped_when_missing(tmp_path, caplog, monkeypatch):
    # simulate an install without the `logging` extra: a None entry makes `import x` fail
    for module in ("tensorboard", "torch.utils.tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)
    writer = MetricsWriter(tmp_path, tensorboard=True, wandb=True)
    writer.log(1, {"a": 1.0})
    writer.close()
    assert caplog.text.count("not installed") == 2
    assert read(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 1.0}]
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "wandb").exists()


def _tb_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    writer = MetricsWriter(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        writer.log(step, {"reward/mean": step / 4, "loss": torch.tensor(2.0 * step),
                          "n": np.int64(step), "algo": "cepo", "bad": math.nan})
    writer.close()
    writer.close()  # idempotent
    assert _tb_scalars(tmp_path / "tensorboard") == {  # strings and NaN are left out
        "reward/mean": [(1, 0.25), (2, 0.5), (3, 0.75)],
        "loss": [(1, 2.0), (2, 4.0), (3, 6.0)],
        "n": [(1, 1.0), (2, 2.0), (3, 3.0)],
    }

    # resumed from the step-2 checkpoint: the crashed run's step 3 is hidden, the new one shows
    resumed = MetricsWriter(tmp_path, tensorboard=True, resume_step=2)
    for step in (3, 4):
        resumed.log(step, {"reward/mean": step / 8})
    resumed.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    scalars = _tb_scalars(tmp_path / "tensorboard")
    assert scalars["reward/mean"] == [(1, 0.25), (2, 0.5), (3, 0.375), (4, 0.5)]
    assert scalars["loss"] == [(1, 2.0), (2, 4.0)]


def _wandb_records(path):
    """The records of a W&B ``.wandb`` transaction log: a 7-byte header, then LevelDB-log
    framing (32 KiB blocks of chunks with a 7-byte crc/length/type header; types 1 = full,
    2/3/4 = first/middle/last piece), each record a serialized ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_runs(run_dir) -> list[tuple[str, dict, list[dict]]]:
    """(run id, config, history rows) of each offline W&B run under `run_dir`, oldest first."""
    runs = []
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        records = list(_wandb_records(path))
        (run,) = [r.run for r in records if r.HasField("run")]
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item} for r in records if r.HasField("history")]
        assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]  # finished
        runs.append((run.start_time.ToNanoseconds(), run.run_id, config, history))
    return [run[1:] for run in sorted(runs)]


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B without network or login: offline runs, all of its files under tmp_path."""
    wandb = pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DIR": tmp_path / "wandb_dir",
                       "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb_config",
                       "WANDB_DATA_DIR": tmp_path / "wandb_data"}.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    yield wandb
    wandb.teardown()  # stop the wandb-core service process this test started


def _close(writer: MetricsWriter, wandb) -> None:
    """Close, then wait until the offline log is on disk: run.finish() can return before the
    wandb-core service has written it; wandb.teardown() (also run at exit) waits for that."""
    writer.close()
    writer.close()  # idempotent
    wandb.teardown()


def test_wandb_offline_history_config_and_resume(tmp_path, wandb_offline):
    run_dir = tmp_path / "run 1"
    config = {"algo": "cepo", "optim": {"lr": 1e-6}}
    writer = MetricsWriter(run_dir, wandb=True, config=config)
    for step in (1, 2, 3):
        writer.log(step, {"reward/mean": step / 4, "loss": torch.tensor(2.0 * step),
                          "algo": "cepo", "bad": math.inf})
    _close(writer, wandb_offline)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id.startswith("run-1-")  # from the run dir's name, made a valid W&B id
    assert not (tmp_path / "wandb").exists()  # written under the run dir, not cwd or WANDB_DIR

    ((got_id, got_config, history),) = _wandb_runs(run_dir)
    assert got_id == run_id
    assert got_config["algo"] == "cepo" and got_config["optim"] == {"lr": 1e-6}
    assert [(h["_step"], h["reward/mean"], h["loss"]) for h in history] == [
        (1, 0.25, 2.0), (2, 0.5, 4.0), (3, 0.75, 6.0)]
    assert not any("algo" in h or "bad" in h for h in history)  # non-numeric values left out

    # resumed from the step-3 checkpoint: the same W&B run id (resume="allow") continues
    resumed = MetricsWriter(run_dir, wandb=True, resume_step=3, config=config)
    resumed.log(4, {"reward/mean": 1.0})
    _close(resumed, wandb_offline)
    first, second = _wandb_runs(run_dir)
    assert first[0] == second[0] == run_id == (run_dir / "wandb_id.txt").read_text().strip()
    assert [(h["_step"], h["reward/mean"]) for h in second[2]] == [(4, 1.0)]

    # a fresh (not resumed) run in the same directory starts a new W&B run
    fresh = MetricsWriter(run_dir, wandb=True)
    fresh.log(1, {"reward/mean": 0.0})
    _close(fresh, wandb_offline)
    new_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert new_id != run_id and _wandb_runs(run_dir)[-1][0] == new_id


def test_summarize_start_vs_end():
    history = [{"step": 0, "val/accuracy": 0.1, "val/reward": 0.1, "val/format": 0.5}]
    history += [{"step": s, "reward/mean": s / 10, "reward/accuracy": 0.0, "reward/format": 1.0}
                for s in range(1, 7)]
    history[-1].update({"val/accuracy": 0.3, "val/reward": 0.4, "val/format": 1.0})
    out = summarize(history)
    assert out["steps"] == 6
    assert out["reward/mean start"] == pytest.approx(0.2)  # steps 1-3
    assert out["reward/mean end"] == pytest.approx(0.5)  # steps 4-6
    assert (out["val/accuracy start"], out["val/accuracy end"]) == (0.1, 0.3)


@pytest.mark.parametrize("steps, start, end", [(3, 0.1, 0.3), (4, 0.15, 0.35), (1, 0.1, 0.1)])
def test_summarize_windows_never_overlap_on_short_runs(steps, start, end):
    history = [{"step": s, "reward/mean": s / 10, "reward/accuracy": 0.0, "reward/format": 1.0}
               for s in range(1, steps + 1)]
    out = summarize(history)
    assert (out["reward/mean start"], out["reward/mean end"]) == (pytest.approx(start),
                                                                  pytest.approx(end))


def test_reduce_across_processes_means_maxes_mins_and_missing_keys(monkeypatch):
    """Two processes' metrics, the other process's metrics given: means, ``*_max``/``*_min``,
    and keys one process lacks averaged over the processes that have them."""
    import accelerate.utils

    mine = {"loss": 1.0, "ratio_max": 2.0, "ratio_min": 0.5, "only_mine": 7.0}
    theirs = {"loss": 3.0, "ratio_max": 5.0, "ratio_min": 0.25, "only_theirs": 4.0}

    keys = sorted(set(mine) | set(theirs))
    other = torch.tensor([theirs.get(k, math.nan) for k in keys], dtype=torch.float64)
    present = torch.isfinite(other)
    # reduce_across gathers twice: the values (missing ones as 0), then which ones are present
    rows = iter([torch.where(present, other, 0.0), present.double()])

    class TwoProcesses:
        num_processes, device = 2, torch.device("cpu")

        def gather(self, local):
            return torch.cat([local, next(rows)[None]])

    monkeypatch.setattr(accelerate.utils, "gather_object", lambda keys: keys + list(theirs))
    assert reduce_across(mine, None) is mine  # one process: nothing to reduce
    out = reduce_across(mine, TwoProcesses())
    assert out == {"loss": 2.0, "ratio_max": 5.0, "ratio_min": 0.25, "only_mine": 7.0,
                   "only_theirs": 4.0}


def test_weight_clip_fraction():
    # eps_w = 0.5: log w = sign(A)·Δ is clipped above log 1.5 = 0.405 and below log 0.5 = -0.693
    delta = torch.tensor([[0.1, 1.0, -1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    weight = torch.tensor([[1.1, 1.5, 0.5, 1.0], [0.6, 0.6, 1.0, 1.0]])
    # row 0 (A>0): 0.1 in, 1.0 high, -1.0 low; row 1 (A<0): -0.5, -0.5 both inside
    stats = token_diagnostics(delta, adv, valid, weight, eps_w=0.5)
    assert stats["cepo/weight_clip_frac"] == pytest.approx(2 / 5)
    assert stats["cepo/weight_clip_frac_high"] == pytest.approx(1 / 5)
    assert stats["cepo/weight_clip_frac_low"] == pytest.approx(1 / 5)
    assert stats["cepo/weight_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 0.6 + 0.6) / 5)
    # Δ over the five valid tokens, torch's own (unbiased) std as the reference
    d = delta[valid]
    assert stats["cepo/delta_mean"] == pytest.approx(d.mean().item())
    assert stats["cepo/delta_std"] == pytest.approx(d.std().item())
    assert stats["cepo/delta_mean_pos"] == pytest.approx(0.1 / 3)
    assert stats["cepo/frac_wrong_dir_pos"] == pytest.approx(1 / 3)  # -1.0 on a correct row
    assert stats["cepo/delta_mean_neg"] == pytest.approx(0.5)
    assert stats["cepo/frac_wrong_dir_neg"] == pytest.approx(1.0)  # Δ > 0 on a rejected row
    assert token_diagnostics(delta, adv, torch.zeros_like(valid), weight, eps_w=0.5) == {}


def test_diagnostics_add_over_processes():
    # two "processes" holding one row each: summed sums give the one-process result
    delta = torch.tensor([[0.3, -0.2, 0.7], [0.1, 0.4, -0.9]])
    adv, valid = torch.tensor([1.0, -2.0]), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    weight = torch.rand(2, 3)
    whole = token_diagnostics(delta, adv, valid, weight, eps_w=0.2)
    parts = [diagnostic_sums(delta[i:i + 1], adv[i:i + 1], valid[i:i + 1], weight[i:i + 1],
                             eps_w=0.2) for i in range(2)]
    split = diagnostics_from_sums((parts[0] + parts[1]).tolist())
    assert split.keys() == whole.keys()
    assert split == pytest.approx(whole)


def test_memory_stats_count_parameters_and_adamw_state():
    from cepo.metrics import GIB, memory_stats

    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)).double()
    opt = torch.optim.AdamW(net.parameters())
    before = memory_stats(net, opt, {"experience": None})
    params = (3 * 5 + 5 + 5 * 2 + 2) * 8  # float64
    assert before == {"memory/params_gib_max": params / GIB, "memory/optimizer_gib_max": 0.0}
    net(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    after = memory_stats(net, opt, {"experience": 1.5, "update": 2.0})
    step_counters = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert after["memory/optimizer_gib_max"] == (2 * params + step_counters) / GIB  # m and v
    assert after["memory/peak_experience_gib_max"] == 1.5
    assert after["memory/peak_update_gib_max"] == 2.0
