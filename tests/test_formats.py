"""Token formats, image tokenizers and the config schema."""
import pytest
import torch

from pararl.batching import build_batch
from pararl.config import ConfigError, build_config
from pararl.formats import ParallelFormat, mmada_m_format, world_format
from pararl.image_tokenizers import PaletteCodec, build_image_tokenizer
from pararl.types import GenerationRequest
from rollout.config import SamplerConfig
from rollout.sample_command import SampleCommandConfig


def test_mmada_m_editing_layout_follows_the_released_format():
    fmt = mmada_m_format()
    codes = torch.arange(1024) % 8192
    p = fmt.encode_prompt([500, 501, 502], codes)
    # the released -M editing sequence: the instruction between BOS and EOS
    assert p.ids[:2] == [126095, 126084] and p.ids[1026] == 126085 and p.ids[-5:] == [126080, 500, 501, 502, 126081]
    assert p.ids[2] == 126464 and p.ids[1025] == 126464 + 1023  # image id = text vocab + code
    # its unconditional row: structure kept, the image span id 0, the instruction BOS EOS EOS ...
    uncond = fmt.unconditional(p, drop_image=True)
    assert uncond[:2] == [126095, 126084] and uncond[2:1026] == [0] * 1024 and uncond[1026] == 126085
    assert uncond[-5:] == [126080] + [126081] * 4
    out, img_off, txt_off = fmt.output_ids(256)
    assert out[0] == 126084 and out[img_off : img_off + 1024] == [126336] * 1024
    assert out[1025:1027] == [126085, 126080] and out[txt_off:] == [126336] * 256
    assert fmt.vocab_size == 134656
    gen = fmt.encode_prompt([126080, 500])  # a prompt that already starts with BOS keeps one
    assert gen.ids == [126088, 126084] + [0] * 1024 + [126085, 126080, 500, 126081]
    assert torch.equal(fmt.image_codes(torch.tensor([126464 + 7, 126336])), torch.tensor([7, -1]))


def test_batch_layout_aligns_outputs_of_unequal_prompts():
    fmt = world_format(40, 8, 16)
    batch = build_batch(fmt, [GenerationRequest([9, 10]), GenerationRequest([9, 10, 11, 12, 13])], text_len=6)
    lay = batch.layout
    assert (batch.input_ids[:, lay.image] == fmt.mask_id).all() and (batch.input_ids[:, lay.text] == fmt.mask_id).all()
    assert batch.attention_mask[0].tolist()[:3] == [0, 0, 0] and batch.attention_mask[1].all()
    assert (batch.input_ids[0, :3] == fmt.pad_id).all()
    assert lay.length - lay.text.stop == 0 and lay.image.stop + 2 == lay.text.start


def test_restricted_logits_never_draw_specials_or_masks():
    fmt = world_format(40, 8, 16)
    logits = torch.zeros(2, 3, fmt.vocab_size + 4)
    text = fmt.restrict_text_logits(logits)
    assert text.shape[-1] == 40 and torch.isinf(text[..., list(fmt.special_ids)]).all()
    assert fmt.mask_id in fmt.special_ids
    assert fmt.restrict_image_logits(logits).shape[-1] == 8


def test_format_round_trips_through_its_dict():
    fmt = mmada_m_format()
    assert ParallelFormat.from_dict(fmt.to_dict()) == fmt
    with pytest.raises(ValueError, match="unknown token-format fields: colour"):
        ParallelFormat.from_dict({**fmt.to_dict(), "colour": 1})


def test_palette_codec_decodes_patches_and_encodes_them_back():
    codec = PaletteCodec(grid=(2, 3), patch=4, codebook_size=6)
    codes = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 5, 0, 0, 1, 1]])
    images = codec.decode(codes)
    assert images.shape == (2, 3, 8, 12) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images[0, :, 4:8, 8:12], codec.palette[5][:, None, None].expand(3, 4, 4))
    assert torch.equal(codec.encode(images), codes)
    assert torch.equal(codec.encode((images + 0.02 * torch.randn_like(images)).clamp(0, 1)), codes)
    same = build_image_tokenizer(codec.spec())
    assert torch.equal(same.decode(codes), images)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 8, 12\]"):
        codec.encode(torch.zeros(1, 3, 9, 12))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 6\)"):
        codec.decode(torch.full((1, 6), 6))
    with pytest.raises(ValueError, match="unknown image tokenizer type 'vq'"):
        build_image_tokenizer({"type": "vq"})


def test_config_refuses_unknown_keys_naming_the_closest():
    cfg = build_config(SampleCommandConfig, [{"sampler": {"steps": 12}}], ["sampler.cfg_image=4"])
    assert isinstance(cfg.sampler, SamplerConfig) and cfg.sampler.steps == 12 and cfg.sampler.cfg_image == 4.0
    with pytest.raises(ConfigError, match=r"unknown config key 'sampler.text_lenght' \(did you mean 'text_len'\?\)"):
        build_config(SampleCommandConfig, overrides=["sampler.text_lenght=3"])
    with pytest.raises(ConfigError, match="unknown config key 'samplr'"):
        build_config(SampleCommandConfig, [{"samplr": {}}])
    with pytest.raises(ConfigError) as bad_type:
        build_config(SampleCommandConfig, overrides=["sampler.steps=many"])
    # one line naming the key, not OmegaConf's four
    assert str(bad_type.value).startswith("invalid config value for 'sampler.steps': Value 'many'")
    assert len(str(bad_type.value).splitlines()) == 1
    with pytest.raises(ConfigError) as far:
        build_config(SampleCommandConfig, overrides=["foo.bar=1"])
    assert str(far.value) == "unknown config key 'foo'"  # no far-off "did you mean"
