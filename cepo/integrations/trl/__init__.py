"""CEPO for TRL: `CEPOGRPOTrainer`, a drop-in subclass of ``trl.GRPOTrainer``, and `CEPOConfig`
(needs the ``trl`` extra, TRL >= 1.16)::

    from cepo.integrations.trl import CEPOConfig, CEPOGRPOTrainer
"""

from cepo.integrations.trl.config import CEPOConfig, generation_index
from cepo.integrations.trl.trainer import CEPOBatch, CEPOGRPOTrainer, fit_input_images

__all__ = ["CEPOBatch", "CEPOConfig", "CEPOGRPOTrainer", "fit_input_images", "generation_index"]
