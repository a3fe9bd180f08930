"""The ``verl.plugins`` entry point: registers the CEPO estimator and trainer mode on import.

verl logs a plug-in that fails to import only at DEBUG level, so a broken install would surface
much later as "Unknown trainer 'cepo'". This module logs the failure at WARNING with its cause
and traceback, and re-raises for verl to see.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Register ``adv_estimator=cepo`` and ``trainer_mode=cepo`` (idempotent)."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    from .estimator import NAME, cepo_group_advantage

    if ADV_ESTIMATOR_REGISTRY.get(NAME) is not cepo_group_advantage:
        register_adv_est(NAME)(cepo_group_advantage)
    from . import trainer  # noqa: F401 - @register_trainer("cepo") runs on import


try:
    register()
except Exception as err:  # reported, then re-raised for verl
    logger.warning("the CEPO plug-in for verl did not load, so algorithm.adv_estimator=cepo and "
                   "trainer.v1.trainer_mode=cepo are unavailable: %s: %s",
                   type(err).__name__, err, exc_info=True)
    raise
