"""The MMaDA-Parallel -A token format (Lumina-DiMOO conventions) at its released ids and sizes."""
import pytest
import torch

from pararl.batching import build_batch
from pararl.formats import DimooFormat, format_from_dict, mmada_a_format, mmada_m_format
from pararl.types import GenerationRequest
from tests.real_tiny import A_SPECIALS, a_tokenizer

MASK, NEWLINE, BOI, EOI, UNCOND, PAD, ANSWER = 126336, 126084, 126349, 126350, 126351, 126339, 126354


@pytest.fixture(scope="module")
def tok():
    return a_tokenizer()


@pytest.fixture(scope="module")
def fmt(tok):
    return mmada_a_format(tok)


def test_a_format_carries_the_released_ids(fmt, tok):
    assert (fmt.mask_id, fmt.newline_id, fmt.boi_id, fmt.eoi_id, fmt.uncond_id, fmt.pad_id, fmt.answer_start_id) == (
        MASK, NEWLINE, BOI, EOI, UNCOND, PAD, ANSWER)
    assert fmt.image_offset == 126356 and fmt.codebook_size == 8192 and fmt.vocab_size == 126356 + 8192
    assert fmt.image_tokens == 1024 and fmt.image_span_len == 1056  # 32 rows of 32 codes + a newline each
    assert fmt.answer_end_ids == (A_SPECIALS["</answer>"],)
    # templates come from the checkpoint's tokenizer, BOS included where it tokenizes a whole prompt
    assert tok.decode(list(fmt.generate_prefix)) == tok.decode(
        tok("<system>Generate an image according to the text prompt.</system><user>")["input_ids"])
    assert fmt.generate_prefix[0] == A_SPECIALS["<|startoftext|>"] and fmt.prompt_suffix == (A_SPECIALS["</user>"],)
    # structure never drawn as text; the pad and </answer> may be (the model pads its answer)
    for i in (MASK, NEWLINE, BOI, EOI, UNCOND, ANSWER, A_SPECIALS["<system>"], A_SPECIALS["</user>"]):
        assert i in fmt.special_ids
    assert PAD not in fmt.special_ids and A_SPECIALS["</answer>"] not in fmt.special_ids


def test_generation_and_editing_sequences(fmt, tok):
    prompt = tok("a red square", add_special_tokens=False)["input_ids"]
    gen = fmt.encode_prompt(prompt)
    whole = tok("<system>Generate an image according to the text prompt.</system><user>a red square</user>")["input_ids"]
    assert gen.ids == whole  # the same ids as tokenizing the released template in one go
    assert [i for i, t in zip(gen.ids, gen.text_mask) if t] == prompt and not any(gen.image_mask)

    codes = torch.arange(1024) * 7 % 8192
    edit = fmt.encode_prompt(prompt, codes)
    n = len(fmt.edit_prefix) + len(prompt)
    assert edit.ids[:n] == list(fmt.edit_prefix) + prompt
    image = edit.ids[n : n + 1058]  # just before the last template token: <boi> 32 x (32 codes, newline) <eoi>
    assert image[0] == BOI and image[-1] == EOI and edit.ids[n + 1058 :] == [A_SPECIALS["</user>"]]
    rows = torch.tensor(image[1:-1]).view(32, 33)
    assert (rows[:, 32] == NEWLINE).all() and torch.equal(rows[:, :32].flatten() - 126356, codes)
    assert [m for m in edit.image_mask].count(True) == 1058 and edit.image_mask[n] and not edit.image_mask[n - 1]

    uncond = fmt.unconditional(edit)
    assert len(uncond) == len(edit.ids)
    assert uncond[len(fmt.edit_prefix) : n] == [UNCOND] + [PAD] * (len(prompt) - 1)
    assert uncond[n:] == edit.ids[n:]  # the input image stays unless dropped
    assert fmt.unconditional(edit, drop_image=True)[n : n + 1058] == [PAD] * 1058
    with pytest.raises(ValueError, match="input image has 16 tokens; format 'mmada-parallel-a' needs 1024"):
        fmt.encode_prompt(prompt, torch.zeros(16, dtype=torch.long))


def test_output_span_has_fixed_newlines_and_codes_come_back_without_them(fmt, tok):
    out, img, txt = fmt.output_ids(256)
    assert out[:2] == [ANSWER, BOI] and img == 2 and txt == 2 + 1056 + 1
    span = torch.tensor(out[img : img + 1056]).view(32, 33)
    assert (span[:, :32] == MASK).all() and (span[:, 32] == NEWLINE).all()
    assert out[txt - 1] == EOI and out[txt : txt + 256] == [MASK] * 256 and out[txt + 256 :] == list(fmt.answer_end_ids)
    codes = torch.randint(0, 8192, (3, 1024))
    assert torch.equal(fmt.span_codes(fmt.span_ids(codes)), codes)
    masked = fmt.span_ids(codes)
    masked[:, 5] = MASK
    assert (fmt.span_codes(masked)[:, 5] == -1).all()
    with pytest.raises(ValueError, match="has 1056 positions, got 1024"):
        fmt.span_codes(codes + 126356)
    # batching: left padding, the image span is the whole 1056 positions, text after <eoi>
    batch = build_batch(fmt, [GenerationRequest(tok("a cat", add_special_tokens=False)["input_ids"]),
                              GenerationRequest(tok("make the circle blue", add_special_tokens=False)["input_ids"], codes[0])], 8)
    lay = batch.layout
    assert lay.image_len == 1056 and lay.text_len == 8 and lay.text.start == lay.image.stop + 1
    assert (batch.input_ids[:, lay.image].view(2, 32, 33)[..., 32] == NEWLINE).all()
    assert batch.uncond_ids.shape == batch.input_ids.shape and (batch.uncond_ids == UNCOND).sum() == 2


def test_formats_round_trip_through_their_dicts(fmt):
    assert format_from_dict(fmt.to_dict()) == fmt and isinstance(format_from_dict(fmt.to_dict()), DimooFormat)
    assert format_from_dict(mmada_m_format().to_dict()) == mmada_m_format()
    with pytest.raises(ValueError, match="unknown token-format layout 'lumina'"):
        format_from_dict({**fmt.to_dict(), "layout": "lumina"})
    small = mmada_a_format(a_tokenizer(), grid=(4, 4))
    assert small.image_tokens == 16 and small.image_span_len == 20
