"""The -M format builds MMaDA's sequences for its other task families, id for id.

Golden ids: tests/fixtures/mmada/prompting.json, the outputs of the released MMaDA prompting code
(Gen-Verse/MMaDA) run outside the project at the tiny full-size -M tokenizer (its README says how).
Understanding (<|mmu|>) and text-to-image (<|t2i|>) are compared with the released inference
scripts' first forward (the prompt with the output masked); plain-text reasoning with the training
prompting's chat turn, which inference_mmu.py shares (one BOS; generate.py tokenizes the rendered
template again and gets two, see the README).
"""
import json
from pathlib import Path

import pytest
import torch

from pararl.batching import build_batch
from pararl.formats import mmada_m_format
from pararl.types import GenerationRequest
from tests.real_tiny import M_SPECIALS, id_tokenizer

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "mmada" / "prompting.json").read_text())
CASES = {c["name"]: c for c in GOLDEN["cases"]}
TOKENIZER = id_tokenizer(M_SPECIALS | GOLDEN["meta"]["chat_specials"])
FMT = mmada_m_format(image_tokens=16, tokenizer=TOKENIZER)


def words(text: str) -> list[int]:
    return TOKENIZER(text)["input_ids"]  # with the BOS the tokenizer prepends, as a dataset's prompt arrives


def test_understanding_equals_the_released_mmu_inference():
    case = CASES["mmu_one_turn"]
    (message,) = case["inputs"]["messages"]
    request = GenerationRequest(words(message["content"]), torch.tensor(case["inputs"]["image_codes"]), task="understand")
    batch = build_batch(FMT, [request], text_len=case["inputs"]["max_seq_length"])
    assert batch.input_ids[0].tolist() == case["first_forward"]["ids"]
    (span,) = case["first_forward"]["mask_spans"]
    assert (batch.layout.text_start, batch.layout.text_start + batch.layout.text_len) == tuple(span)
    assert batch.layout.image_len == 0


@pytest.mark.parametrize("name", ["t2i_batch_guidance", "t2i_truncated_no_guidance"])
def test_text_to_image_equals_the_released_t2i_inference_where_it_attends(name):
    """MMaDA left-pads the prompt with its own [iPAD] to a fixed length, pararl to the batch's longest:
    the attended ids, and the output's columns counted from the right, are the same."""
    case = CASES[name]
    prompts = case["inputs"]["prompts"]
    if name == "t2i_truncated_no_guidance":  # MMaDA cuts a prompt past max_seq_length: give it the kept words
        kept = [row["tokens"] for row in case["cond"]]
        prompts = [" ".join(t for t in toks if not t.startswith(("<", "["))) for toks in kept]
    requests = [GenerationRequest(words(p), task="t2i") for p in prompts]
    batch = build_batch(FMT, requests, text_len=8)
    for r, (row, attn) in enumerate(zip(case["cond"], case["cond_attention_mask"])):
        theirs = [i for i, a in zip(row["ids"], attn) if a]
        ours = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
        assert ours == theirs
        (span,) = row["mask_spans"]
        assert batch.layout.image_start - batch.layout.length == span[0] - len(row["ids"])
    assert batch.layout.text_len == 0


def test_reasoning_equals_the_released_chat_prompting():
    case = CASES["text_train"]
    (row,), (prompt_mask,) = case["input_ids"], case["prompt_mask"]
    golden_prompt = [i for i, m in zip(row["ids"], prompt_mask) if m]
    question = "is the square blue"
    batch = build_batch(FMT, [GenerationRequest(words(question), task="reason")], text_len=8)
    lay = batch.layout
    assert batch.input_ids[0, : lay.output_start].tolist() == golden_prompt
    assert batch.input_ids[0, lay.output].tolist() == [FMT.mask_id] * 8  # the answer follows the turn at once
    assert (lay.text_start, lay.text_len, lay.image_len) == (lay.output_start, 8, 0)


def test_understanding_at_inference_is_the_training_prompt_of_the_same_turn():
    case = CASES["mmu_train"]
    row, prompt_mask = case["input_ids"][1], case["prompt_mask"][1]
    golden_prompt = [i for i, m in zip(row["ids"], prompt_mask) if m]
    codes = torch.tensor(case["inputs"]["image_codes"][1])
    request = GenerationRequest(words("is it blue"), codes, task="understand")
    batch = build_batch(FMT, [request], text_len=4)
    assert batch.input_ids[0, : batch.layout.output_start].tolist() == golden_prompt


def test_a_chat_task_without_the_chat_tokens_is_refused_by_name():
    plain = mmada_m_format(image_tokens=16, tokenizer=id_tokenizer(M_SPECIALS))
    with pytest.raises(Exception, match="no chat template ids: a reason request needs them"):
        plain.encode_prompt(words("is it blue"), None, "reason")
    saved = type(FMT).from_dict(FMT.to_dict())
    assert saved == FMT and saved.chat_user_ids == (126346, 27, 126347)
