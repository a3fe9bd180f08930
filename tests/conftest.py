"""Test-wide setup. Without a GPU, Triton kernels run in the CPU interpreter, which must be
switched on before triton is first imported, i.e. here, before any test module imports it."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import cepo.offline  # noqa: F401 - the offline kit's model and dataset names (tiny-warm, ...)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
