"""Integrations of the CEPO method into training frameworks, on top of the scoring core.

* ``cepo.integrations.trl``: ``CEPOGRPOTrainer`` / ``CEPOConfig``, a drop-in subclass of TRL's
  ``GRPOTrainer`` (needs the ``trl`` extra, TRL >= 1.16).
* ``cepo.integrations.verl``: a verl plug-in (``verl.plugins`` entry point) registering
  ``algorithm.adv_estimator=cepo`` and ``trainer.v1.trainer_mode=cepo`` (the ``verl`` extra,
  verl 0.9, in a venv of its own).

Nothing here is imported by ``import cepo``; each integration imports its framework only when
its own module is imported.
"""
