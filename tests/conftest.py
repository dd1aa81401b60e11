"""Settings for the unit tests in tests/ (the notebooks' nbval settings are in the root conftest.py).

PyTorch runs on one thread in the test process, set here at import so it holds from collection on.
The tests' tensors are tiny: a second thread only adds hand-offs, and on the shared 2-core machine
it made small tests about 10x slower (measured). One fixed thread count also makes float results
reproducible: the same seed on 1 and 2 threads can differ in the last bits. The notebooks' kernels
are separate processes and keep PyTorch's default.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

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


# torch warns about its own deprecated internals when a library first loads torch._inductor: PEFT ≥ 0.22
# imports bitsandbytes on its first adapter load, bitsandbytes calls torch.compile, and torch/utils/mkldnn.py
# still uses torch.jit.script_method. Such a warning comes from torch's files and says nothing about the adapter.
TORCH_DIR = Path(torch.__file__).resolve().parent


def _from_torch_itself(warning: warnings.WarningMessage) -> bool:
    return issubclass(warning.category, DeprecationWarning) and Path(warning.filename).resolve().is_relative_to(
        TORCH_DIR
    )


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    relevant = [w for w in caught if not _from_torch_itself(w)]
    assert not relevant, [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in relevant]


@pytest.fixture
def no_warnings() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """``with no_warnings(): ...`` fails the test on any warning raised inside, torch's notices about its own
    deprecated internals excepted. PEFT's only sign of an adapter it could not place is a warning
    ("Found missing adapter keys"), after which B stays zero."""
    return _no_warnings
