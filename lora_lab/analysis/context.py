"""Can the model's window see what the entropy floor assumes it sees?

The built-in corpus's entropy floor (:func:`lora_lab.data.grammar.entropy_floor_ppl`) is the
cross-entropy of a model that knows everything since the start of the current sentence. A GPT
sees only its window: predicting character ``p`` of a sentence that starts at ``s`` (just after
the previous ``"\\n"``) needs the ``p - s + 1`` characters from that newline on. Where the window
is shorter, the rules that span the sentence (a question opened by *does* closes with ``?``)
cannot be known and no model of that window can reach the floor there.

:func:`window_reach` measures this on a text: how long its sentences are next to the window, and
what fraction of the positions the perplexity evaluation scores (:func:`lora_lab.training.perplexity`,
whose windows overlap by half, so each scored position sees between half a window and a whole
one) have their sentence's start in view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..training.metrics import evaluation_windows
from ..validation import check_positive_int

__all__ = ["WindowReach", "window_reach"]


@dataclass(frozen=True)
class WindowReach:
    """Sentences of a text against a window of ``block_size`` characters.

    ``longest`` and the lengths count the sentence's characters with its closing ``"\\n"``;
    ``longer_than_window`` is the share of sentences whose start and end cannot both be in one
    window. ``reach_full_window`` is the share of characters whose sentence start (the newline
    before it) fits in a whole window behind them; ``reach_evaluation`` the same share among the
    positions :func:`lora_lab.training.perplexity` scores, with the context each is scored with.
    """

    block_size: int
    sentences: int
    mean_length: float
    p95_length: float
    longest: int
    longer_than_window: float
    reach_full_window: float
    reach_evaluation: float

    def summary(self) -> str:
        return (
            f"window {self.block_size}: {self.sentences:,} sentences, mean {self.mean_length:.1f} characters, "
            f"95% ≤ {self.p95_length:.0f}, longest {self.longest}; {self.longer_than_window:.1%} longer than the "
            f"window; sentence start in view for {self.reach_full_window:.1%} of characters with a whole window "
            f"and {self.reach_evaluation:.1%} of the positions the perplexity evaluation scores"
        )


def _needed_context(text: str) -> np.ndarray:
    """For each position ``p`` ≥ 1 (a character to predict, index ``p - 1`` in the result): how
    many characters behind it a model must see to reach back to the newline before its sentence.
    The text's first sentence has no newline before it (a split starts mid-sentence): it counts as
    starting before the text, so its start is never in view."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    positions = np.arange(len(codes))
    newline = np.where(codes == ord("\n"), positions, -1)
    last_newline = np.maximum.accumulate(newline)  # at or before each position
    # Predicting p sees characters < p: the sentence of p starts after the last newline before p.
    before = np.concatenate(([-1], last_newline[:-1]))
    return (positions - before)[1:]


def window_reach(text: str, block_size: int) -> WindowReach:
    """Measure how much of ``text``'s sentence structure a ``block_size`` window can see (see the
    module's docstring). ``text`` is a sequence of ``"\\n"``-terminated sentences, as the built-in
    corpus's splits are; a text without a newline has one sentence."""
    block_size = check_positive_int("block_size", block_size)
    if len(text) < 2:
        raise ValueError("window_reach needs a text of at least two characters")
    lines = text.split("\n")
    # A split can start and end mid-sentence: count only the complete sentences' lengths.
    complete = lines[1:-1] if len(lines) > 2 else lines
    lengths = np.array([len(line) + 1 for line in complete], dtype=float)
    needed = _needed_context(text)
    scored_context = np.zeros(len(text) - 1, dtype=np.int64)  # index p - 1: the context p is scored with
    size = min(block_size, len(text) - 1)
    for start, first in evaluation_windows(len(text), block_size):
        offsets = np.arange(first, size)
        scored_context[start + offsets] = offsets + 1  # target start + 1 + j sees j + 1 characters
    return WindowReach(
        block_size=block_size,
        sentences=len(complete),
        mean_length=float(lengths.mean()),
        p95_length=float(np.percentile(lengths, 95)),
        longest=int(lengths.max()),
        longer_than_window=float((lengths > block_size).mean()),
        reach_full_window=float((needed <= block_size).mean()),
        reach_evaluation=float((needed <= scored_context).mean()),
    )
