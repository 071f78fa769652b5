"""Reward models a user would write, found by ``module:Class`` from the config (no project code change)."""
import time

import torch


class WordCountReward:
    """Score = words in the text + 10 x mean red of the image: each result is checkable against its request."""

    def __init__(self, delay_s: float = 0.0, nan_word: str | None = None) -> None:
        self.delay_s, self.nan_word = delay_s, nan_word
        self.identity = f"word-count(delay={delay_s})"

    def score(self, images, texts):
        if self.delay_s:
            time.sleep(self.delay_s)
        scores = torch.tensor([float(len(t.split())) for t in texts]) + 10 * images[:, 0].mean((1, 2))
        if self.nan_word:
            scores[torch.tensor([self.nan_word in t for t in texts], dtype=torch.bool)] = float("nan")
        return scores


def brightness(images, texts, scale=1.0):
    return (images.mean((1, 2, 3)) * scale).tolist()


class PartlyNaNReward:
    """A flaky reward model: NaN for the first ``share`` of the rows of every batch it gets (rows are
    trajectory-major, so whole trajectories), word counts for the rest."""

    def __init__(self, share: float = 0.5) -> None:
        self.share = share
        self.identity = f"partly-nan({share})"

    def score(self, images, texts):
        scores = torch.tensor([float(len(t.split())) for t in texts]) + images[:, 0].mean((1, 2))
        scores[: int(len(texts) * self.share)] = float("nan")
        return scores


class RaisingReward:
    """A reward model with a bug: it raises on every batch."""

    identity = "raising"

    def score(self, images, texts):
        raise KeyError("no such column: 'clip_score'")
