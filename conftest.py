"""nbval settings for the notebooks (``pytest --nbval --nbval-current-env tests notebooks``).

This file sits at the repository root because pytest applies a conftest.py's hooks only to the
files below its own folder: hooks in tests/conftest.py never see notebooks/*.ipynb. The hooks are
nbval 0.11's documented remedies, applied to its collector (``IPyNbFile``) and cells (``IPyNbCell``):

- stderr is not compared: warnings there name the kernel's temporary files
  (``/tmp/ipykernel_<pid>/...``), and tqdm writes its progress bars there in plain text;
- nbval waits only 5 s for each output message after a cell finishes (a hard-coded
  ``IPyNbCell.output_timeout``); on a loaded 2-core machine a training cell's last messages can
  take longer, so we wait up to ``OUTPUT_TIMEOUT`` (the whole cell stays bounded by
  ``--nbval-cell-timeout``);
- notebooks/nbval_sanitize.cfg (memory addresses, temporary names) is used as
  ``--nbval-sanitize-with`` unless another file is given on the command line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

try:
    from nbval.plugin import IPyNbCell, IPyNbFile
except ImportError:  # nbval is a test dependency; without it there are no notebook items to configure
    IPyNbCell = IPyNbFile = None

SANITIZE_FILE = Path(__file__).parent / "notebooks" / "nbval_sanitize.cfg"
OUTPUT_TIMEOUT = 120  # seconds per output message; only a broken kernel ever waits this long


def pytest_configure(config: pytest.Config) -> None:
    option = config.option
    given = getattr(option, "nbval_sanitize_with", None) or getattr(option, "sanitize_with", None)
    if IPyNbFile is not None and not given and SANITIZE_FILE.is_file():
        option.nbval_sanitize_with = str(SANITIZE_FILE)


def pytest_collectstart(collector: pytest.Collector) -> None:
    if IPyNbFile is not None and isinstance(collector, IPyNbFile):
        collector.skip_compare += ("stderr",)


def pytest_itemcollected(item: pytest.Item) -> None:
    if IPyNbCell is not None and isinstance(item, IPyNbCell):
        item.output_timeout = OUTPUT_TIMEOUT
