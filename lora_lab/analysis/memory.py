"""What training costs in memory, and the comparison table that puts it next to the results."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..files import format_bytes
from ._entries import ModelEntry, model_entries

__all__ = ["optimizer_memory_bytes", "comparison_table"]


def optimizer_memory_bytes(model: nn.Module) -> int:
    """Bytes of training state under AdamW, from the model's parameters alone: each trainable
    parameter keeps its weight, its gradient and AdamW's two moments (``exp_avg``,
    ``exp_avg_sq``) — 4 copies, 16 bytes in fp32 — and each frozen one only its weight (4 bytes).

    Activations are not counted: they depend on batch size and sequence length, and LoRA does
    not shrink them (the frozen layers' inputs are still kept for the input gradients). This
    is a model, not a measurement (``benchmarks/`` measures); shared parameters count once.
    """
    total = 0
    for param in model.parameters():
        copies = 4 if param.requires_grad else 1
        total += copies * param.numel() * param.element_size()
    return total


def comparison_table(
    models: Mapping[str, ModelEntry], memory: Mapping[str, int], floors: Mapping[str, float] | None = None
) -> str:
    """Markdown: per model (:class:`~lora_lab.experiment.results.ModelResult`\\ s, or entries of
    ``results.json``'s ``models``) target and source perplexity, the source perplexity's change
    from ``base`` (forgetting), trainable parameters and their share, training time (for
    ``base``: its pretraining), training-state memory (``memory[name]``, from
    :func:`optimizer_memory_bytes`) and the saved artifact's size."""
    models = model_entries(models)
    lines = [
        "| model | target ppl | source ppl | Δ source | trainable | share | train s | training state | artifact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if floors:
        lines.append(f"| *entropy floor* | {floors['target']:.3f} | {floors['source']:.3f} | | | | | | |")
    base_source = models["base"]["source_ppl"] if "base" in models else None
    for name, entry in models.items():
        # The base is not fine-tuned: no trainable share or forgetting; its time is its pretraining.
        tuned = name != "base"
        change = f"{entry['source_ppl'] - base_source:+.3f}" if tuned and base_source is not None else "—"
        trainable = f"{entry['trainable_params']:,}" if tuned else "—"
        share = f"{entry['trainable_params'] / entry['total_params']:.2%}" if tuned else "—"
        artifact = "—" if entry.get("artifact_bytes") is None else format_bytes(entry["artifact_bytes"])
        state = format_bytes(memory[name]) if name in memory else "—"
        lines.append(
            f"| {name} | {entry['target_ppl']:.3f} | {entry['source_ppl']:.3f} | {change} | {trainable} | {share} | "
            f"{entry['train_seconds']:.1f} | {state} | {artifact} |"
        )
    return "\n".join(lines)
