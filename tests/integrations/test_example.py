"""`examples/custom_loop.py` runs end to end on the tiny model and does what it says."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_loop.py"


def _load():
    spec = importlib.util.spec_from_file_location("custom_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_loop_runs(tiny_vl_dir, capsys):
    history = _load().main(["--steps", "2", "--model-dir", tiny_vl_dir])
    assert [h["step"] for h in history] == [1, 2]
    assert "step 2:" in capsys.readouterr().out
    for h in history:
        assert torch.isfinite(torch.tensor(h["loss"]))
        a, a_hat, mask = h["advantages"], h["token_advantages"], h["mask"]
        full = a[:, None].expand_as(a_hat)
        # docs/METHOD.md, "Guarantees": same sign as A, within |A|(1 ± λ ε_w), 0 on padding, and
        # not plain GRPO
        assert torch.equal(torch.sign(a_hat[mask]), torch.sign(full[mask]))
        bound = h["lambda"] * 0.5 * full.abs() + 1e-6
        assert ((a_hat - full).abs()[mask] <= bound[mask]).all()
        assert (a_hat[~mask] == 0).all()
        assert not torch.allclose(a_hat[mask], full[mask])
