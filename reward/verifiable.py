"""Verifiable text rewards (MMaDA's UniGRPO): is the final answer right, is the reasoning well formed.

A text reward takes N generated texts and, per text, its record's reference answer (None when the
record has none) and returns N floats in [0, 1], or NaN where it cannot score. NaN is not 0: a text
without a reference has no evidence against it, and a 0 would teach the policy that an answer is
wrong when nobody knows. ``score_texts`` turns NaN, and a function that raises, into a per-item
problem the caller drops and counts, never into a silent average. Users swap rewards like reward
models: a registered name, or ``module:function`` with keyword arguments from the config.
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Sequence

import torch

from pararl.errors import ConfigError, RunError
from pararl.registry import Registry
from reward.base import find

TextRewardFn = Callable[..., Sequence[float]]  # fn(texts, references, **kwargs) -> one float per text
TEXT_REWARDS: Registry[TextRewardFn] = Registry("text reward")
register_text_reward = TEXT_REWARDS.register


@dataclass(frozen=True)
class TextReward:
    """A text reward with its config arguments bound, and the name its problems are reported under."""

    name: str
    fn: TextRewardFn
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, texts: Sequence[str], references: Sequence[str | None]) -> Sequence[float]:
        return self.fn(texts, references, **self.kwargs)


def build_text_reward(name: str, kwargs: dict[str, Any] | None = None) -> TextReward:
    """A registered name or ``module:function`` -> the bound reward; wrong arguments fail now, at
    config load, rather than on the first batch of a run."""
    kwargs = dict(kwargs or {})
    fn = find(TEXT_REWARDS, name, "module:function")
    if not callable(fn):
        raise ConfigError(f"text reward {name!r} is not callable: {fn!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: its first call will tell
        return TextReward(name, fn, kwargs)
    try:
        signature.bind([""], [None], **kwargs)
    except TypeError as err:
        raise ConfigError(f"text reward {name!r} rejects its arguments {sorted(kwargs)}: {err}") from err
    return TextReward(name, fn, kwargs)


# --- answers ---------------------------------------------------------------------------------------

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    " sixteen seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_LEAD = " \t\n\"'`*([{$:"  # a leading "." or "-" belongs to a number (".5", "-3")
_TRAIL = " \t\n\"'`*)]}$.,;:!?"
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")
# "the answer is X." / "Final answer: X": X ends at a sentence end (". " or end of line), so "3.5." is "3.5"
_PHRASE = re.compile(r"\banswer\s*(?:is\b\s*:?|:)\s*([^\n]+?)\s*(?:[.!?;](?=\s|$)|\n|$)", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}``, braces balanced (``\boxed{\frac{1}{2}}``); None if unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 1, start + len("\\boxed{")
    for j in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[begin:j]
    return None


def _last_sentence(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", lines[-1].strip()) if s.strip()]
    return sentences[-1].strip()


def extract_answer(text: str, tag: str = "answer", think_end: str | None = "</think>") -> str | None:
    r"""The final answer of a reasoning text, or None when it gives none (callers count these).

    Tried in order, the last occurrence of each winning: ``<tag>...</tag>``, ``\boxed{...}``, a
    trailing "answer is X" / "answer: X", else the last sentence of the last line. Only the text
    after the last ``think_end`` is searched: a "the answer is 4" mid-reasoning is a draft, not the answer.
    """
    if think_end and think_end in text:
        text = text.rsplit(think_end, 1)[1]
    tagged = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL)
    if tagged:
        return tagged[-1].strip() or None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    phrases = _PHRASE.findall(text)
    if phrases:
        return phrases[-1].strip() or None
    return _last_sentence(text)


def normalise_answer(answer: str) -> str:
    """Case, surrounding punctuation and whitespace, articles, number words (zero..twenty) and
    thousands separators removed, so "The Three." and "3" compare equal."""
    words = []
    for word in answer.lower().split():
        bare = word.strip(_LEAD + _TRAIL)
        if bare not in _ARTICLES:
            words.append(_NUMBER_WORDS.get(bare, word))
    text = " ".join(words).lstrip(_LEAD).rstrip(_TRAIL)
    return text.replace(",", "") if _THOUSANDS.fullmatch(text) else text


def answers_match(answer: str, reference: str) -> bool:
    """Equal after normalisation, or the same number ("3" = "3.0"), for any "|"-separated alternative."""
    given = normalise_answer(answer)
    for alternative in reference.split("|"):
        wanted = normalise_answer(alternative)
        if not wanted:
            continue
        if given == wanted or (_NUMBER.fullmatch(given) and _NUMBER.fullmatch(wanted) and Decimal(given) == Decimal(wanted)):
            return True
    return False


@register_text_reward("answer")
def answer_match(texts: Sequence[str], references: Sequence[str | None], tag: str = "answer",
                 think_end: str | None = "</think>") -> list[float]:
    """1.0 right, 0.0 wrong or missing (``extract_answer`` tells which), NaN without a reference.

    A blank reference counts as none: it would match nothing and mark every answer wrong.
    """
    scores = []
    for text, reference in zip(texts, references, strict=True):
        if reference is None or not reference.strip():
            scores.append(math.nan)
            continue
        answer = extract_answer(text, tag, think_end)
        scores.append(1.0 if answer is not None and answers_match(answer, reference) else 0.0)
    return scores


# --- format ----------------------------------------------------------------------------------------

def follows_format(text: str, start: str = "<think>", end: str = "</think>", answer_tag: str | None = None) -> bool:
    """``start`` reasoning ``end`` answer, exactly once: a small parser rather than a regex search, so
    each way to be malformed (no close, two blocks, nesting, empty parts, preamble) is one plain check.
    With ``answer_tag`` the answer must be ``<tag>X</tag>`` with X non-empty."""
    if not start or not end or start == end:
        raise ConfigError(f"format reward needs distinct, non-empty start and end tags, got {start!r} and {end!r}")
    body = text.strip()
    if not body.startswith(start) or body.count(start) != 1 or body.count(end) != 1:
        return False
    reasoning, _, answer = body[len(start):].partition(end)
    if not reasoning.strip() or not answer.strip():
        return False
    if answer_tag is None:
        return True
    open_tag, close_tag = f"<{answer_tag}>", f"</{answer_tag}>"
    inner = re.fullmatch(rf"\s*{re.escape(open_tag)}(.*?){re.escape(close_tag)}\s*", answer, re.DOTALL)
    return bool(inner and inner.group(1).strip()) and answer.count(open_tag) == 1


@register_text_reward("format")
def format_reward(texts: Sequence[str], references: Sequence[str | None] | None = None, start: str = "<think>",
                  end: str = "</think>", answer_tag: str | None = None) -> list[float]:
    """1.0 for a text that follows the declared reasoning structure, 0.0 otherwise (needs no reference)."""
    return [1.0 if follows_format(text, start, end, answer_tag) else 0.0 for text in texts]


# --- scoring a batch -------------------------------------------------------------------------------

def _name_of(fn: Callable[..., Any]) -> str:
    registered = next((name for name in TEXT_REWARDS if TEXT_REWARDS[name] is fn), None)
    return registered or getattr(fn, "name", None) or getattr(fn, "__name__", None) or repr(fn)


class _BadScores(ValueError):
    """The function returned, but not one number per text."""


def _floats(values: Any, n: int) -> list[float]:
    try:
        scores = torch.as_tensor(values, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise _BadScores(f"returned {type(values).__name__} that is not numbers ({err})") from err
    if scores.numel() != n:
        raise _BadScores(f"returned {scores.numel()} scores for {n} texts")
    return scores.tolist()


def score_texts(fn: Callable[..., Any], texts: Sequence[str], references: Sequence[str | None],
                on_error: str = "drop") -> tuple[torch.Tensor, list[str | None]]:
    """One text reward over a batch -> (scores [N] float32, one problem message or None per text).

    The whole batch is scored in one call; only if that raises is each text scored alone, so a bad
    item is named by its index and the others keep their scores. An item that raises or scores
    non-finite is NaN with its problem recorded ("drop"), or stops the run with a RunError ("fail").
    """
    if on_error not in ("drop", "fail"):
        raise ConfigError(f"on_error must be 'drop' or 'fail', got {on_error!r}")
    texts, references = list(texts), list(references)
    if len(texts) != len(references):
        raise ValueError(f"{len(texts)} texts but {len(references)} references")
    name = _name_of(fn)
    try:
        values: list[float] = _floats(fn(texts, references), len(texts))
        errors: list[Exception | None] = [None] * len(texts)
    except Exception:  # noqa: BLE001 - attributed item by item below
        values, errors = [math.nan] * len(texts), [None] * len(texts)
        for i, (text, reference) in enumerate(zip(texts, references)):
            try:
                values[i] = _floats(fn([text], [reference]), 1)[0]
            except Exception as err:  # noqa: BLE001 - recorded as the item's problem, or raised below
                errors[i] = err
    scores = torch.full((len(texts),), math.nan, dtype=torch.float32)
    problems: list[str | None] = [None] * len(texts)
    for i, (value, err) in enumerate(zip(values, errors)):
        if isinstance(err, _BadScores):
            problem = f"text reward {name!r} {err} on item {i}"
        elif err is not None:
            problem = f"text reward {name!r} raised on item {i}: {type(err).__name__}: {err}"
        elif not math.isfinite(value):
            problem = f"text reward {name!r} returned {value} for item {i}"
        else:
            scores[i] = value
            continue
        if on_error == "fail":
            raise RunError(problem) from err
        problems[i] = problem
    return scores, problems
