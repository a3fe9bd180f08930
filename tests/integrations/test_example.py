"""`examples/custom_loop.py` runs end to end on the tiny model and does what it says."""

from __future__ import annotations

import ast
import tempfile

import torch

from tests.helpers import EXAMPLES, load_example


def _load():
    return load_example("custom_loop")


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


def test_custom_loop_leaves_no_temporary_folder(monkeypatch, tmp_path, capsys):
    """Without --model-dir the tiny model is built in a temporary folder that is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    history = _load().main(["--steps", "1"])
    assert [h["step"] for h in history] == [1]
    assert list(tmp_path.iterdir()) == []


def test_custom_loop_imports_only_public_functions():
    """The recipe uses the kernels' public API, transformers, and three documented cepo
    functions; no private names and none of the trainer's internal batch layout."""
    tree = ast.parse((EXAMPLES / "custom_loop.py").read_text())
    imported = {(node.module, alias.name) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    import cepo_kernels

    for module, name in imported:
        assert not name.startswith("_"), (module, name)
        if module == "cepo_kernels":
            assert name in cepo_kernels.__all__, name
    assert {m for m, _ in imported if m.startswith("cepo.")} == \
        {"cepo.grading", "cepo.negatives", "cepo.offline.tiny"}
