"""Settings for the unit tests in tests/ (the notebooks' nbval settings are in the root conftest.py).

PyTorch runs on one thread in the test process, set here at import so it holds from collection on.
The tests' tensors are tiny: a second thread only adds hand-offs, and on the shared 2-core machine
it made small tests about 10x slower (measured). One fixed thread count also makes float results
reproducible: the same seed on 1 and 2 threads can differ in the last bits. The notebooks' kernels
are separate processes and keep PyTorch's default.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
