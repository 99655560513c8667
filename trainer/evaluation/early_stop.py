"""Stop at the peak: the rule that ends a run once the monitor says its best checkpoint is behind it.

The workshop says to stop when the concept shows without its trigger, or when prompts stop changing the
output, once sample quality has peaked. Over the monitor's per-checkpoint history (trainer/evaluation/
metrics.py CheckpointMetrics, in step order) a checkpoint is **past the peak** when

- it is flagged by `metrics.flag` (flexibility below FLEX_MIN of the base model's, or leakage above LEAK_MAX:
  the recommendation's own thresholds, read from there, never copied), and
- its strength (`metrics.strength_of`) is no new high: not above the best strength of every earlier checkpoint (the base
  model's strength is 0 by definition, so a first checkpoint that moved away from the dataset is no rise;
  a history without strength, i.e. no dataset latents, counts on the flags alone).

The run stops when its latest `patience` checkpoints are all past the peak, and keeps the checkpoint that
`metrics.recommend` picks over the whole history. Pure functions: the decision is a function of the
numbers alone, so a resumed run that restores the history decides exactly as the uninterrupted one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from . import metrics as mt


@dataclass(frozen=True)
class StopDecision:
    """Stop after checkpoint `step`; the run's LoRA becomes checkpoint `keep_step`'s; `reason` in words."""

    step: int
    keep_step: int
    keep_label: str
    reason: str
    patience: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StopDecision:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def past_peak(history: Sequence[mt.CheckpointMetrics]) -> list[bool]:
    """Per checkpoint in step order: flagged by the recommendation's thresholds, with no new strength high."""
    ordered = [dataclasses.replace(m, flags=[]) for m in mt._order(history)]  # copies: flag() writes m.flags
    mt.flag(ordered)
    best, out = 0.0, []
    for m in ordered:
        s = mt.strength_of(m)
        rising = s is not None and s > best
        best = max(best, s) if s is not None else best
        out.append(bool(m.flags) and not rising)
    return out


def decide(history: Sequence[mt.CheckpointMetrics], patience: int) -> StopDecision | None:
    """The stop decision after the latest checkpoint of `history`, None to go on (or when `patience` < 1)."""
    if patience < 1 or len(history) < patience:
        return None
    marks = past_peak(history)
    if not all(marks[-patience:]):
        return None
    ordered = [dataclasses.replace(m, flags=[]) for m in mt._order(history)]
    last = ordered[-1]
    pick, why = mt.recommend(ordered)  # flags `ordered` too
    if pick is None or pick.step is None or last.step is None:
        return None
    run = ordered[-patience:]
    strengths = [(s, m) for m in ordered if (s := mt.strength_of(m)) is not None]
    peak = (f"strength peaked at {max(strengths, key=lambda x: x[0])[1].label} "
            f"({max(s for s, _ in strengths):.2f})" if strengths else "concept strength not measured")
    reason = (f"stopped at the peak after {last.label}: {patience} consecutive checkpoint"
              f"{'s' if patience > 1 else ''} ({', '.join(m.label for m in run)}) past it ({peak}; "
              f"{last.label}: {'; '.join(last.flags)}). The LoRA is {pick.label}'s: {why}")
    return StopDecision(step=last.step, keep_step=pick.step, keep_label=pick.label, reason=reason,
                        patience=patience)
