"""MAGVIT-v2 (the -M image tokenizer): the released module structure and key names, LFQ codes, a tiny model."""
import pytest
import torch

from pararl.image_tokenizers import Magvit2Tokenizer, build_image_tokenizer
from pararl.image_tokenizers.magvit2 import MagvitConfig, MagvitV2, load_magvit2, save_magvit2

TINY = MagvitConfig(ch=32, encoder_ch_mult=(1, 2), encoder_res_blocks=(1, 2), decoder_ch_mult=(1, 2),
                    decoder_res_blocks=(2, 1), resolution=8, attn_resolutions=(4,))


def tiny_magvit(seed: int = 0) -> MagvitV2:
    torch.manual_seed(seed)
    return MagvitV2(TINY).eval()


def test_released_architecture_has_the_released_key_names_and_shapes():
    with torch.device("meta"):
        state = MagvitV2(MagvitConfig()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.3.downsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (13, 512, 3, 3) and shapes["encoder.quant_conv.weight"] == (13, 13, 1, 1)
    assert shapes["decoder.post_quant_conv.weight"] == (13, 13, 1, 1) and shapes["decoder.conv_in.weight"] == (512, 13, 3, 3)
    assert shapes["decoder.up.4.block.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.up.0.block.3.norm2.bias"] == (128,) and shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert shapes["quantize.embedding"] == (8192, 13) and shapes["quantize.power_vals"] == (13,)
    assert not any(k.startswith("encoder.down.4.downsample") or k.startswith("decoder.up.0.upsample") for k in shapes)
    assert not any(".attn.0." in k for k in shapes), "the release has attention only in the middle blocks"
    blocks = [sum(k.startswith(f"encoder.down.{i}.block.") and k.endswith("conv1.weight") for k in shapes) for i in range(5)]
    assert blocks == [4, 3, 4, 3, 4]
    assert [sum(k.startswith(f"decoder.up.{i}.block.") and k.endswith("conv1.weight") for k in shapes) for i in range(5)] == [4, 4, 3, 4, 3]
    assert MagvitConfig().downsampling == 16  # 512x512 images are 32x32 codes


def test_lookup_free_codes_are_the_binary_numbers_of_the_signs():
    q = tiny_magvit().quantize
    assert torch.equal(q.latents(torch.tensor([[1, 4096]]), (1, 2))[0, :, 0, :].T,
                       torch.tensor([[-1.0] * 12 + [1.0], [1.0] + [-1.0] * 12]))
    codes = torch.randint(0, 8192, (3, 20))
    assert torch.equal(q.codes(q.latents(codes, (4, 5))), codes)
    z = torch.randn(2, 13, 4, 5)
    expected = ((z > 0).long() * 2 ** torch.arange(12, -1, -1)[None, :, None, None]).sum(1).flatten(1)
    assert torch.equal(q.codes(z), expected)


def test_tiny_magvit_saved_and_loaded_decodes_and_encodes(tmp_path):
    model = tiny_magvit(1)
    folder = save_magvit2(model, tmp_path / "magvitv2")
    tok = build_image_tokenizer({"type": "magvit2", "path": str(folder), "grid": [4, 4], "device": "cpu"})
    assert isinstance(tok, Magvit2Tokenizer) and tok.codebook_size == 8192 and tok.image_size == (8, 8)
    assert "encoder.down.1.attn.1.q.weight" in model.state_dict() and "decoder.up.1.attn.0.proj_out.bias" in model.state_dict()
    codes = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    images = tok.decode(codes)
    assert images.shape == (2, 3, 8, 8) and 0 <= images.min() and images.max() <= 1
    with torch.no_grad():
        expected = ((model.decoder(model.quantize.latents(codes, (4, 4))) + 1) / 2).clamp(0, 1)
    assert torch.allclose(images, expected, atol=1e-6)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(tok.encode(x), model.quantize.codes(model.encoder(x * 2 - 1)))
    assert torch.equal(build_image_tokenizer(tok.spec()).decode(codes), images)

    # weights as a torch .bin without the (computable) LFQ buffers, as other exports store them
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("quantize.")}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert torch.allclose(Magvit2Tokenizer(str(folder), grid=(4, 4), device="cpu").decode(codes), images)
    del state["decoder.conv_in.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing \['decoder.conv_in.weight'\]"):
        load_magvit2(folder)
