"""The -A image tokenizer: a diffusers VQModel loaded from a ``vqvae`` subfolder."""
import json

import pytest
import torch

from pararl.image_tokenizers import VQModelTokenizer, build_image_tokenizer
from tests.real_tiny import tiny_vqmodel


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq")
    vq = tiny_vqmodel(codebook=64, seed=3)
    vq.save_pretrained(root / "vqvae")
    # the same weights, configured as aMUSEd's VQ is (the model looks the codes up itself)
    vq.save_pretrained(root / "lookup" / "vqvae")
    cfg_file = root / "lookup" / "vqvae" / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"lookup_from_codebook": True}))
    return root


def test_decode_maps_codes_through_the_codebook_and_the_decoder(folder):
    tok = build_image_tokenizer({"type": "vqmodel", "path": str(folder), "grid": [4, 4], "device": "cpu"})
    assert isinstance(tok, VQModelTokenizer) and tok.codebook_size == 64 and tok.image_size == (8, 8)
    codes = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    images = tok.decode(codes)
    assert images.shape == (3, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    m = tok.model
    with torch.no_grad():  # by hand: codebook rows as a [B, C, h, w] latent, post-quant conv, decoder
        latents = m.quantize.embedding.weight[codes].view(3, 4, 4, 4).permute(0, 3, 1, 2)
        expected = m.decoder(m.post_quant_conv(latents)).clamp(0, 1)
    assert torch.allclose(images, expected, atol=1e-5)
    looked_up = build_image_tokenizer({"type": "vqmodel", "path": str(folder / "lookup"), "grid": [4, 4], "device": "cpu"})
    assert torch.allclose(looked_up.decode(codes), images, atol=1e-5)
    assert torch.equal(build_image_tokenizer(tok.spec()).decode(codes), images)


def test_encode_takes_the_nearest_codebook_entry(folder):
    tok = VQModelTokenizer(str(folder), grid=(4, 4), device="cpu")
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    codes = tok.encode(images)
    assert codes.shape == (2, 16) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 64
    with torch.no_grad():
        z = tok.model.encode(images).latents.permute(0, 2, 3, 1).reshape(-1, 4)
        nearest = torch.cdist(z, tok.model.quantize.embedding.weight).argmin(-1).view(2, 16)
    assert torch.equal(codes, nearest)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 8, 8\]"):
        tok.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        tok.decode(torch.full((1, 16), 64))
    with pytest.raises(FileNotFoundError, match="holds no VQModel"):
        VQModelTokenizer(str(folder), subfolder="missing")
