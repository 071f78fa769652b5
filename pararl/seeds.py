"""Seeds derived from a run's seed: the i-th request, epoch or step gets its own, and a formula used in
two places (a prompt's seed in training and in evaluation) is the same one.

``derive(seed, i, stride) = seed * stride + i``: distinct runs' seeds stay apart for any i below the
stride. The strides are kept as they were first chosen, so a run's numbers do not move.
"""
from __future__ import annotations

STRIDE = 1_000_003  # requests (a trajectory group's noise) and the driver's per-step draws
EPOCH_STRIDE = 100_003  # the order of the prompts in each pass over the dataset
PLAN_STRIDE = 7919  # the learner's per-iteration log-probability plan


def derive(seed: int, index: int, stride: int = STRIDE) -> int:
    return seed * stride + index
