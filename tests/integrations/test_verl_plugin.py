"""The verl plug-in loads on ``import verl`` (a broken one is reported), its estimator runs through
verl's own dispatch, and the shipped config composes with verl's. Needs the verl venv
(``pip install -e '.[verl]'``); skipped elsewhere."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]', own venv)")

from tests.integrations.verl_helpers import expected_grpo  # noqa: E402

ROOT = pathlib.Path(__file__).parents[2]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT, check=False)


def test_import_verl_registers_estimator_and_trainer_mode():
    """A fresh process: nothing but ``import verl`` (the entry point) registers both."""
    out = run_python(
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "print(get_adv_estimator_fn('cepo').__module__, get_trainer_cls('cepo').__name__)\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["cepo.integrations.verl.estimator", "CEPOTrainer"], (
        "the verl.plugins entry point did not register (is cepo installed in this venv with "
        f"pip install -e '.[verl]'?)\n{out.stderr[-2000:]}")


def test_a_broken_plugin_is_reported_at_warning():
    """verl itself logs a failed plug-in only at DEBUG; ours says so at WARNING, with the cause."""
    out = run_python(
        "import sys\n"
        "sys.modules['cepo.integrations.verl.trainer'] = None  # its import now fails\n"
        "import verl\n"
        "from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY\n"
        "print('cepo' in TRAINER_REGISTRY)\n")
    assert out.returncode == 0, out.stderr[-3000:]
    warning = [line for line in out.stderr.splitlines()
               if line.startswith("WARNING") and "the CEPO plug-in for verl did not load" in line]
    assert warning and "ModuleNotFoundError" in warning[0]  # the cause, on the warning line
    assert out.stdout.split()[-1] == "False"


def test_estimator_through_verls_compute_advantage():
    """``adv_estimator=cepo`` dispatched by verl: A per group (any order), on response tokens."""
    import numpy as np
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    uids = ["b", "a", "b", "a", "a", "c", "c"]
    scores = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.5]
    mask = torch.ones(7, 5, dtype=torch.int64)
    mask[2, 3:] = 0
    rewards = torch.zeros(7, 5)
    rewards[torch.arange(7), mask.sum(1) - 1] = torch.tensor(scores)
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                               non_tensors={"uid": np.array(uids, dtype=object)})
    out = compute_advantage(data, adv_estimator="cepo", num_repeat=1,
                            config={"norm_adv_by_std_in_grpo": True})
    want = torch.zeros(7)
    for g in set(uids):
        ix = [i for i, u in enumerate(uids) if u == g]
        want[ix] = torch.tensor(expected_grpo([scores[i] for i in ix]))
    torch.testing.assert_close(out.batch["advantages"], want[:, None] * mask)
    with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo"):
        compute_advantage(data, adv_estimator="cepo", num_repeat=1,
                          config={"norm_adv_by_std_in_grpo": False})


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import cepo.integrations.verl as pkg

    with initialize_config_dir(config_dir=os.path.dirname(pkg.__file__), version_base=None):
        return hydra_compose(config_name="cepo_trainer", overrides=list(overrides))


def test_shipped_config_composes_with_verls_and_switches_to_cepo():
    from cepo.errors import ConfigError
    from cepo.integrations.verl.trainer import check_config

    cfg = compose("cepo.lambda_init=0.3", "cepo.neg_fallback=positive")
    assert cfg.algorithm.adv_estimator == "cepo" and cfg.trainer.v1.trainer_mode == "cepo"
    assert "ppo_mini_batch_size" in cfg.actor_rollout_ref.actor  # verl's own config underneath
    options = check_config(cfg)
    assert options.lam(1) == 0.3 and options.teacher.neg_fallback == "positive"
    # verl's own check of the whole config (main_ppo runs it first) accepts the cepo: block
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    full = compose("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
                   "actor_rollout_ref.model.path=unused")
    with pytest.warns(UserWarning, match="Disabled critic"):  # no critic: a group advantage
        validate_config(config=full, use_reference_policy=need_reference_policy(full),
                        use_critic=need_critic(full))
    with pytest.raises(ConfigError, match="adv_estimator=cepo"):
        check_config(compose("algorithm.adv_estimator=gae"))
    with pytest.raises(ConfigError, match="cepo.lam_0"):
        check_config(compose("+cepo.lam_0=0.1"))
    with pytest.raises(ConfigError, match="lora_rank"):
        check_config(compose("cepo.teacher_model=base"))
    assert check_config(compose("cepo.teacher_model=base", "actor_rollout_ref.model.lora_rank=8"))


def test_cepo_mode_takes_verls_synchronous_branches():
    """verl compares trainer_mode with "sync" (replay buffer, refill, queue checkpoints)."""
    from cepo.integrations.verl.trainer import CEPOTrainer

    trainer = CEPOTrainer.__new__(CEPOTrainer)
    trainer.trainer_mode = "cepo"
    assert trainer.trainer_mode == "sync"
    with pytest.raises(ValueError, match="trainer_mode=cepo"):
        trainer.trainer_mode = "separate_async"


@pytest.mark.slow
def test_a_ray_worker_sees_the_trainer_mode():
    """verl builds its trainer inside a Ray actor (TaskRunnerV1): there too, ``import verl`` alone
    must register the mode."""
    out = run_python(
        "import ray\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "@ray.remote\n"
        "def mode():\n"
        "    import verl\n"
        "    from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "    return get_trainer_cls('cepo').__name__\n"
        "print(ray.get(mode.remote()))\n"
        "ray.shutdown()\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "CEPOTrainer"
