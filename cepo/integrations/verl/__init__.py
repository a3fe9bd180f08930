"""CEPO as a verl plug-in (``pip install 'cepo[verl]'``; docs in the README, "CEPO in verl").

verl imports every ``verl.plugins`` entry point on ``import verl``, in every process; ours is
`cepo.integrations.verl.plugin`, which registers ``algorithm.adv_estimator=cepo`` (`estimator`)
and ``trainer.v1.trainer_mode=cepo`` (`trainer`). `step` and `options` do not import verl.
"""
