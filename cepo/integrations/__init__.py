"""Integrations of the CEPO method into training frameworks, on top of the scoring core.

* ``cepo.integrations.trl``: ``CEPOGRPOTrainer`` / ``CEPOConfig``, a drop-in subclass of TRL's
  ``GRPOTrainer`` (needs the ``trl`` extra, TRL >= 1.16).

Nothing here is imported by ``import cepo``; each integration imports its framework only when
its own module is imported.
"""
