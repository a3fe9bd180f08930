"""Tiny offline models for the integration tests, built once per session into a temp directory:
the mini Qwen3-VL of `cepo.offline.tiny`, and the tiny text-only Qwen3 causal LM of
`examples/trl_cpu.py` sharing its tokenizer."""

from __future__ import annotations

import pytest

from tests.helpers import load_example


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory) -> str:
    from cepo.offline.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "vl", vocab="mini"))


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory, tiny_vl_dir) -> str:
    path = tmp_path_factory.mktemp("tiny") / "text"
    return str(load_example("trl_cpu").build_tiny_text_model(path, tiny_vl_dir))
