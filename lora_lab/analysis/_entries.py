"""A measured model as the tables and figures read it.

``lora-lab run`` and the notebooks hold :class:`~lora_lab.experiment.results.ModelResult`\\ s
(what :func:`~lora_lab.experiment.stages.evaluate` returns), while ``paper/build.py`` and
readers of an old ``results.json`` hold its JSON entries: both are accepted, as a mapping.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..experiment.results import ModelResult

#: A measured model: a ModelResult, or a ``results.json`` ``models`` entry.
ModelEntry = ModelResult | Mapping


def model_entries(models: Mapping[str, ModelEntry] | None) -> dict[str, Mapping]:
    """``models`` with each ModelResult turned into its ``results.json`` entry; ``{}`` for None."""
    return {name: e.to_dict() if isinstance(e, ModelResult) else e for name, e in (models or {}).items()}
