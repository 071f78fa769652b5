"""Verifiable text rewards: answer extraction and matching, the format parser, batch scoring, the registry."""
import math

import pytest
import torch

from pararl.errors import ConfigError, RunError
from reward.verifiable import (
    TEXT_REWARDS,
    answer_match,
    build_text_reward,
    extract_answer,
    format_reward,
    normalise_answer,
    score_texts,
)


def text_length(texts, references, scale=1.0):
    """A user's text reward, found as ``tests.test_verifiable:text_length``."""
    return [min(1.0, len(t) * scale) for t in texts]


def raises_on_boom(texts, references):
    if any("boom" in t for t in texts):
        raise KeyError("no boom allowed")
    return [0.5] * len(texts)


def nan_on_empty(texts, references):
    return [math.nan if not t else 1.0 for t in texts]


def test_right_answers_in_other_formats_match():
    texts = ["Two and one make... The answer is three.", "So the total is \\boxed{1,000}.",
             "<think>red or blue</think><answer> Red </answer>", "I count them:\ntwo", "The answer: 2.0"]
    assert answer_match(texts, ["3", "1000", "red", "2|two", "2|two"]) == [1.0] * 5


def test_extraction_order_and_what_each_form_gives():
    assert extract_answer("<answer>6</answer> no, <answer>7</answer> and \\boxed{8}; the answer is 9") == "7"
    assert extract_answer("\\boxed{\\frac{1}{2}} so the answer is 9") == "\\frac{1}{2}"
    assert extract_answer("First the answer is 4. Then, checking, the answer is 5. Done") == "5"
    assert extract_answer("The answer is 3.5.") == "3.5"
    assert extract_answer("Counting the squares gives\nfour. Or 6") == "Or 6"
    assert extract_answer("<result>x</result>", tag="result") == "x"
    # a draft answer inside the reasoning is not the answer; the text after </think> is
    assert extract_answer("<think>the answer is 4? no, 5</think> 5") == "5"


def test_normalisation_by_hand():
    assert normalise_answer("  The Three Apples!") == "3 apples"
    assert normalise_answer("$1,000.") == "1000"
    assert normalise_answer("-.5") == "-.5"
    assert normalise_answer("An Owl") == "owl"


def test_wrong_answers_score_zero():
    texts = ["The answer is four.", "\\boxed{1001}", "<answer>blue</answer>", "The answer is 2.5", "three hundred"]
    assert answer_match(texts, ["3", "1000", "red", "2|two", "3"]) == [0.0] * 5


def test_missing_answer_scores_zero_and_is_told_apart():
    missing = ["", "   \n ", "<think>the answer is 4</think>", "<answer>  </answer>", "\\boxed{}"]
    for text in missing:
        assert extract_answer(text) is None, text
    assert answer_match(missing, ["4"] * 5) == [0.0] * 5


def test_no_reference_is_nan_never_zero():
    scores = answer_match(["The answer is 3", "The answer is 3", "The answer is 3"], [None, "  ", "3"])
    assert math.isnan(scores[0]) and math.isnan(scores[1]) and scores[2] == 1.0


@pytest.mark.parametrize("text,ok", [
    ("<think>2 + 1 = 3</think> 3", True),
    ("  <think>\nadd them\n</think>\nThe answer is 3.\n", True),
    ("<think>2 + 1 = 3 so 3", False),  # missing close tag
    ("<think>a</think> 3 <think>b</think> 3", False),  # two blocks
    ("<think>a <think>b</think> c</think> 3", False),  # nested
    ("<think>a</think> b</think> 3", False),  # a stray second close tag
    ("<think>2 + 1 = 3</think>   ", False),  # empty answer
    ("<think>  </think> 3", False),  # empty reasoning
    ("Sure! <think>a</think> 3", False),  # preamble before the reasoning
    ("</think>a<think> 3", False),  # close before open
    ("3", False),
])
def test_format_default_think_then_answer(text, ok):
    assert format_reward([text]) == [1.0 if ok else 0.0]


def test_format_with_declared_tags_and_answer_tag():
    kwargs = {"start": "<reason>", "end": "</reason>", "answer_tag": "answer"}
    texts = ["<reason>r</reason> <answer>3</answer>", "<reason>r</reason> 3", "<reason>r</reason><answer> </answer>",
             "<reason>r</reason><answer>3</answer> more", "<think>r</think><answer>3</answer>"]
    assert format_reward(texts, None, **kwargs) == [1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="non-empty start and end"):
        format_reward(["x"], start="")


def test_a_throwing_item_and_a_nan_item_are_problems_the_others_scored():
    scores, problems = score_texts(raises_on_boom, ["a", "boom", "c"], [None] * 3)
    assert torch.equal(scores[[0, 2]], torch.tensor([0.5, 0.5])) and math.isnan(scores[1])
    assert problems[0] is None and problems[2] is None
    assert "'raises_on_boom' raised on item 1: KeyError" in problems[1] and "no boom allowed" in problems[1]

    scores, problems = score_texts(nan_on_empty, ["a", "", "c"], [None] * 3)
    assert scores.dtype == torch.float32 and scores[0] == 1.0 and scores[2] == 1.0 and math.isnan(scores[1])
    assert problems == [None, "text reward 'nan_on_empty' returned nan for item 1", None]

    scores, problems = score_texts(answer_match, ["The answer is 3", "The answer is 3"], ["3", None])
    assert scores[0] == 1.0 and math.isnan(scores[1]) and problems[1] == "text reward 'answer' returned nan for item 1"


def test_batch_called_once_when_it_works_and_wrong_counts_are_problems():
    calls = []

    def counting(texts, references):
        calls.append(len(texts))
        return [0.25] * len(texts)

    scores, _ = score_texts(counting, ["a", "b", "c"], [None] * 3)
    assert calls == [3] and torch.equal(scores, torch.full((3,), 0.25))
    scores, problems = score_texts(lambda t, r: [1.0, 1.0], ["a"], ["x"])
    assert math.isnan(scores[0]) and problems[0] == "text reward '<lambda>' returned 2 scores for 1 texts on item 0"
    scores, problems = score_texts(lambda t, r: ["high"] * len(t), ["a"], ["x"])
    assert math.isnan(scores[0]) and "'<lambda>' returned list that is not numbers" in problems[0]


def test_fail_raises_naming_the_reward_and_the_item():
    with pytest.raises(RunError, match=r"'raises_on_boom' raised on item 2: KeyError"):
        score_texts(raises_on_boom, ["a", "b", "boom"], [None] * 3, on_error="fail")
    with pytest.raises(RunError, match=r"'answer' returned nan for item 0"):
        score_texts(build_text_reward("answer"), ["The answer is 3"], [None], on_error="fail")
    with pytest.raises(ConfigError, match="'drop' or 'fail'"):
        score_texts(nan_on_empty, ["a"], [None], on_error="skip")


def test_registry_refuses_unknown_names_and_arguments():
    assert {"answer", "format"} <= set(TEXT_REWARDS)
    with pytest.raises(ConfigError, match=r"unknown text reward 'exact'; known: answer, format.*module:function"):
        build_text_reward("exact")
    with pytest.raises(ConfigError, match=r"text reward 'format' rejects its arguments \['open'\]"):
        build_text_reward("format", {"open": "<t>"})
    with pytest.raises(ConfigError, match="has no 'missing'"):
        build_text_reward("tests.test_verifiable:missing")


def test_registered_and_module_function_rewards_are_built_with_their_arguments():
    fmt = build_text_reward("format", {"start": "<r>", "end": "</r>"})
    assert fmt(["<r>x</r> y", "<think>x</think> y"], [None, None]) == [1.0, 0.0]
    user = build_text_reward("tests.test_verifiable:text_length", {"scale": 0.25})
    assert user.fn is text_length and user(["ab", "abcdef"], [None, None]) == [0.5, 1.0]
    scores, problems = score_texts(user, ["ab", ""], ["x", "y"])
    assert torch.equal(scores, torch.tensor([0.5, 0.0])) and problems == [None, None]
    with pytest.raises(RunError, match=r"'tests.test_verifiable:raises_on_boom' raised on item 0"):
        score_texts(build_text_reward("tests.test_verifiable:raises_on_boom"), ["boom"], [None], on_error="fail")
