"""Damaged, hostile and half-written checkpoints: checksums and fallback, nothing unpickled
beyond tensors, a full disk named, and no path followed out of the run directory."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cepo import checkpoint as ckpt
from cepo.metrics import MetricsWriter
from cepo.rundir import UnsafePathError
from cepo.samples import SampleWriter


def _save(run_dir, step, keep_last=3):
    tmp = ckpt.begin(run_dir, step)
    save_file({"w": torch.full((64,), float(step))}, tmp / "adapter_model.safetensors")
    ckpt.save_rng(tmp, 0)
    ckpt.save_optimizer({"state": {"w": {"exp_avg": torch.ones(4)}}, "param_groups": []}, tmp)
    return ckpt.commit(run_dir, step, {"lr": 0.1}, keep_last)


def _flip(file: Path, offset: int = -3) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


def _rehash(checkpoint: Path, name: str) -> None:
    """What an attacker who can write the run directory can do too: fix the recorded checksum."""
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    data = (checkpoint / name).read_bytes()
    state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    state_file.write_text(json.dumps(state))


def test_flipped_bytes_fall_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    bad = tmp_path / "checkpoints" / "step-000003" / "adapter_model.safetensors"
    _flip(bad)  # in the data section: the header still parses
    with caplog.at_level(logging.WARNING):
        assert ckpt.resume_point(tmp_path).name == "step-000002"
    assert str(bad) in caplog.text and "SHA-256" in caplog.text
    assert ckpt.resolve_checkpoint_path(tmp_path).name == "step-000002"  # eval / merge too
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.resolve_checkpoint_path(bad.parent)  # asked for by name: refused, not replaced


@pytest.mark.parametrize("name", ["trainer_state.json", "rng/rank-0.pt", "optimizer.pt",
                                  "adapter_model.safetensors"])
def test_a_truncated_file_is_named_and_the_previous_checkpoint_used(tmp_path, caplog, name):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    file = newest / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert ckpt.resume_point(tmp_path).name == "step-000001"
    assert str(file) in caplog.text
    assert ("not valid JSON" if name.endswith(".json") else "truncated") in caplog.text

    (tmp_path / "checkpoints" / "step-000001" / "rng" / "rank-0.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint") as err:
        ckpt.resume_point(tmp_path)
    assert str(file) in str(err.value) and "rank-0.pt" in str(err.value)


def test_truncated_files_are_named_when_loaded(tmp_path):
    """The loaders name the file too (a checkpoint written without checksums, or read
    directly): a truncated RNG file, optimizer file or safetensors file."""
    final = _save(tmp_path, 1)
    for name in ("rng/rank-0.pt", "optimizer.pt", "adapter_model.safetensors"):
        file = final / name
        file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="rank-0.pt: unreadable"):
        ckpt.load_rng(final, 0)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt: unreadable"):
        ckpt.load_optimizer(final)
    with pytest.raises(ckpt.CheckpointError, match="adapter_model.safetensors: .*truncated"):
        ckpt.check_safetensors(final / "adapter_model.safetensors")


def test_keep_last_never_rotates_out_an_intact_checkpoint_for_a_damaged_one(tmp_path,
                                                                           monkeypatch):
    for step in (1, 2):
        _save(tmp_path, step, keep_last=2)
    real_sync = ckpt._fsync_tree

    def sync_then_damage(root):  # the storage corrupts a file after it was hashed
        real_sync(root)
        if root.name == ".tmp-step-000003":
            _flip(root / "adapter_model.safetensors")

    monkeypatch.setattr(ckpt, "_fsync_tree", sync_then_damage)
    with pytest.raises(ckpt.CheckpointError, match="adapter_model.safetensors: SHA-256"):
        _save(tmp_path, 3, keep_last=2)
    names = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step")]
    assert sorted(names) == ["step-000001", "step-000002", "step-000003"]  # nothing deleted
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000002"
    assert ckpt.resume_point(tmp_path).name == "step-000002"


@pytest.mark.parametrize("name", ["rng/rank-0.pt", "optimizer.pt"])
def test_a_planted_pickle_payload_is_refused_not_run(tmp_path, name):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    final = _save(tmp_path, 1)
    torch.save({"python": Payload(), "state": Payload()}, final / name)
    _rehash(final, name)  # the checksum matches: only weights_only stands in the way
    assert ckpt.verify(final)
    load = ckpt.load_rng if name.startswith("rng") else ckpt.load_optimizer
    args = (final, 0) if name.startswith("rng") else (final,)
    with pytest.raises(ckpt.CheckpointError, match=f"{name}: refused: .*posix.system"):
        load(*args)
    assert not marker.exists()


class _FullDisk:
    """A file that takes 64 bytes, then fails every write with ENOSPC, as a full disk does."""

    def __init__(self, path, mode):
        self.file = open(path, mode)  # noqa: SIM115 - closed in __exit__

    def write(self, data):
        if self.file.tell() + len(data) > 64:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """ENOSPC during torch.save: the error names the file and the cause, not torch's
    'unexpected pos 64 vs 0'."""
    tmp = ckpt.begin(tmp_path, 1)
    monkeypatch.setattr(ckpt, "open", _FullDisk, raising=False)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.save_optimizer({"state": {}, "param_groups": [{"lr": torch.ones(1 << 16)}]}, tmp)
    assert f"{tmp / 'optimizer.pt'}: could not write" in str(err.value)
    assert "No space left on device" in str(err.value)
    with pytest.raises(ckpt.CheckpointError, match="rank-0.pt: could not write.*No space"):
        ckpt.save_rng(tmp, 0)


# --------------------------------------------------------------------------- links


def test_a_linked_staging_directory_is_refused(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step-000001").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        ckpt.begin(run, 1)
    assert list(outside.iterdir()) == []


def test_a_latest_pointer_that_leaves_the_run_is_refused(tmp_path):
    other = tmp_path / "other"
    _save(other, 6)
    run = tmp_path / "a" / "run"
    _save(run, 2)
    (run / "checkpoints" / "latest").write_text("../../../other/checkpoints/step-000006")
    with pytest.raises(UnsafePathError, match="not the name of a checkpoint"):
        ckpt.resume_point(run)


@pytest.mark.parametrize("what", ["checkpoint", "checkpoints", "file in checkpoint"])
def test_linked_checkpoints_are_refused(tmp_path, what):
    other, run = tmp_path / "other", tmp_path / "run"
    theirs = _save(other, 4)
    _save(run, 2)
    if what == "checkpoint":
        (run / "checkpoints" / "step-000004").symlink_to(theirs)
    elif what == "checkpoints":
        (run / "checkpoints").rename(tmp_path / "moved")
        (run / "checkpoints").symlink_to(tmp_path / "moved")
    else:
        mine = run / "checkpoints" / "step-000002" / "optimizer.pt"
        mine.unlink()
        mine.symlink_to(theirs / "optimizer.pt")
    with pytest.raises((UnsafePathError, ckpt.CheckpointError), match="symbolic link"):
        ckpt.resume_point(run)


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.jsonl"])
@pytest.mark.parametrize("resume_step", [0, 1])
def test_linked_record_files_are_refused(tmp_path, name, resume_step):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        if name == "metrics.jsonl":
            MetricsWriter(run, resume_step=resume_step)
        else:
            SampleWriter(run, 2, resume_step=resume_step)
    assert target.read_text() == "keep me\n"


def test_nonfinite_weights_are_never_staged(tmp_path):
    from types import SimpleNamespace

    from cepo import resume
    from cepo.update import NonFiniteError

    net = torch.nn.Linear(3, 2)
    run = SimpleNamespace(model=net, world=1, accelerator=None)
    resume.check_finite_weights(run, 1)  # finite: fine
    with torch.no_grad():
        net.bias[1] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to save step 7: .*bias"):
        resume.check_finite_weights(run, 7)


def test_the_trainer_refuses_a_latest_pointer_out_of_the_run(tmp_path):
    """End to end: a clear 'error:' line before any work, not a resume from another run."""
    import cepo.train as train_module

    other = tmp_path / "other"
    _save(other, 6)
    run = tmp_path / "a" / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("../../../other/checkpoints/step-000006")
    with pytest.raises(SystemExit, match="error: .*latest: holds .*refusing"):
        train_module.main(["--output_dir", str(run), "--resume", "--device", "cpu"])
