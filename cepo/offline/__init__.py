"""The offline kit: what lets every part of the pipeline run without a download or a GPU.

* `cepo.offline.tiny`: tiny random-weight Qwen3-VL checkpoints (model names ``tiny``,
  ``tiny-mini``, ``tiny-qwen``);
* `cepo.offline.warmup`: the tiny model briefly taught the synthetic task (``tiny-warm``, the
  offline default);
* `cepo.offline.synthetic`: synthetic visual-math sets (data source ``synthetic``).

The core never imports this package: importing it registers those names in `cepo.registry`, where
`cepo.models` and `cepo.data` resolve them. The builders are imported on first use, so this
import stays cheap.
"""

from __future__ import annotations

from cepo.registry import register_dataset, register_model

TINY_VOCABS = {"tiny": "mini", "tiny-mini": "mini", "tiny-qwen": "qwen"}
WARM_NAME = "tiny-warm"


def _tiny(vocab: str):
    def build():
        from cepo.offline.tiny import build_tiny_model

        return build_tiny_model(vocab=vocab)

    return build


def _warm():
    from cepo.offline.warmup import build_warm_tiny

    return build_warm_tiny()


def _synthetic(split: str = "train", *, limit: int | None = None, seed: int = 0):
    from cepo.offline.synthetic import synthetic_dataset

    return synthetic_dataset(split, size=limit, seed=seed)


for _name, _vocab in TINY_VOCABS.items():
    register_model(_name, _tiny(_vocab))
register_model(WARM_NAME, _warm)
register_dataset("synthetic", _synthetic)
