"""Integrations of the CEPO kernels into training frameworks.

* ``cepo_kernels.integrations.trl``: ``CEPOGRPOTrainer`` / ``CEPOConfig``, a drop-in subclass of
  TRL's ``GRPOTrainer`` (needs the ``trl`` extra, TRL >= 1.16).

Nothing here is imported by ``import cepo_kernels``; each integration imports its framework
only when its own module is imported.
"""
