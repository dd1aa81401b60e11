"""Settings for the unit tests in tests/ (the notebooks' nbval settings are in the root conftest.py).

PyTorch runs on one thread in the test process, set here at import so it holds from collection on.
The tests' tensors are tiny: a second thread only adds hand-offs, and on the shared 2-core machine
it made small tests about 10x slower (measured). One fixed thread count also makes float results
reproducible: the same seed on 1 and 2 threads can differ in the last bits. The notebooks' kernels
are separate processes and keep PyTorch's default.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lora_lab.experiment import stages

torch.set_num_threads(1)


@pytest.fixture
def forbid_training(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``forbid_training(why)``: from then on, any call of lora_lab's training loop fails the test
    with ``why`` (the code under test must reuse a cached artifact, or fail before training)."""

    def forbid(why: str) -> None:
        def no_training(*args, **kwargs):
            raise AssertionError(why)

        monkeypatch.setattr(stages, "train", no_training)

    return forbid
