"""The RLSD baseline's own defaults: ε_w 0.2 and λ_k = 0.5·(1 − k/25), as the reference's RLSD
script runs it; CEPO keeps its schedule; explicit options override both."""

from __future__ import annotations

from pathlib import Path

import pytest

from cepo import config as C
from cepo.config import ConfigError, build_config
from cepo.schedule import lam_at

PAPER_2B = str(Path(__file__).resolve().parents[2] / "configs" / "paper_2b.yaml")


def schedule(cfg, steps=30):
    return [lam_at(k, cfg.cepo.lambda_init, cfg.cepo.lambda_warmup_steps, cfg.cepo.lambda_offset)
            for k in range(1, steps + 1)]


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_rlsd_takes_eps_w_0_2_and_the_reference_rlsd_schedule(preset):
    cfg = build_config(["--config", PAPER_2B, "--preset", preset, "--algo", "rlsd"])
    assert cfg.cepo.eps_w == 0.2
    expected = [0.5 * max(0.0, 1 - k / 25) for k in range(1, 31)]  # written as the script does
    assert schedule(cfg) == pytest.approx(expected, abs=1e-12)
    assert schedule(cfg)[:2] == pytest.approx([0.48, 0.46]) and schedule(cfg)[24] == 0.0


@pytest.mark.parametrize("preset, eps_w", [("paper", 0.5), ("reference", 0.2)])
def test_cepo_keeps_its_own_schedule_and_eps_w(preset, eps_w):
    cfg = build_config(["--config", PAPER_2B, "--preset", preset, "--algo", "cepo"])
    assert cfg.cepo.eps_w == eps_w and cfg.cepo.lambda_offset == 0
    lams = schedule(cfg)
    assert lams[:2] == pytest.approx([0.5, 0.48]) and lams[24] == pytest.approx(0.02)
    assert lams[25] == 0.0


def test_flags_override_the_rlsd_defaults():
    cfg = build_config(["--config", PAPER_2B, "--algo", "rlsd", "--eps_w", "0.5",
                        "--lambda_offset", "0", "--lambda_init", "0.4"])
    assert (cfg.cepo.eps_w, cfg.cepo.lambda_offset, cfg.cepo.lambda_init) == (0.5, 0, 0.4)
    assert schedule(cfg)[:2] == pytest.approx([0.4, 0.4 * 24 / 25])
    # a YAML layer overrides them too, and a saved config reloads to the same values
    cfg = build_config(["--algo", "rlsd", "--cepo.eps_w=0.3"])
    assert cfg.cepo.eps_w == 0.3 and cfg.cepo.lambda_offset == 1


def test_saved_config_keeps_the_filled_values(tmp_path):
    cfg = build_config(["--algo", "rlsd"])
    C.save_yaml(cfg, tmp_path / "config.yaml")
    again = C.from_yaml(tmp_path / "config.yaml")
    assert (again.cepo.eps_w, again.cepo.lambda_offset) == (0.2, 1) and again == cfg


def test_help_documents_the_per_algorithm_defaults():
    text = C.help_text()
    assert "0.2 (rlsd)" in text and "the reference RLSD script" in text


@pytest.mark.parametrize("args, match", [
    (["--lambda_offset", "-1"], "cepo.lambda_offset=-1"), (["--eps_w", "1"], "cepo.eps_w=1.0"),
])
def test_bad_values_are_refused(args, match):
    with pytest.raises(ConfigError, match=match):
        build_config(args)


def test_lam_at_offset():
    assert lam_at(1, 0.5, 25, 1) == pytest.approx(0.48)
    assert lam_at(3, 0.5, 0, 1) == 0.5  # T_warm 0: constant
    with pytest.raises(ValueError, match="offset"):
        lam_at(1, 0.5, 25, -1)
