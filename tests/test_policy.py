"""The policy model loads real LLaDA checkpoints exactly and refuses broken ones by name."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pararl.models import CheckpointError, build_policy, load_policy
from tests.tiny import tiny_config

# Copied from shared/fixtures: written by the reference LLaDA implementation, with its logits.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "llada-reference"


def reference_forward(state: dict, cfg, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA written out with plain tensors: explicit softmax attention, kv heads copied per query group."""
    p = "model.transformer."
    d, h = cfg.d_model, cfg.n_heads
    kvh, hd = cfg.n_kv_heads or h, d // h
    b, n = ids.shape

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    inv = torch.tensor([1.0 / cfg.rope_theta ** (2 * i / hd) for i in range(hd // 2)])
    ang = torch.arange(n).float()[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # x [b, heads, n, hd], rotate-half over the full head
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = state[p + "wte.weight"][ids]
    for i in range(cfg.n_layers):
        q_ = lambda name: state[f"{p}blocks.{i}.{name}.weight"]  # noqa: E731
        a = rms(x, q_("attn_norm"))
        q = (a @ q_("q_proj").T).view(b, n, h, hd).transpose(1, 2)
        k = (a @ q_("k_proj").T).view(b, n, kvh, hd).transpose(1, 2)
        v = (a @ q_("v_proj").T).view(b, n, kvh, hd).transpose(1, 2)
        group = h // kvh
        k = torch.stack([k[:, j // group] for j in range(h)], 1)
        v = torch.stack([v[:, j // group] for j in range(h)], 1)
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        x = x + att.transpose(1, 2).reshape(b, n, d) @ q_("attn_out").T
        f = rms(x, q_("ff_norm"))
        x = x + (torch.nn.functional.silu(f @ q_("ff_proj").T) * (f @ q_("up_proj").T)) @ q_("ff_out").T
    x = rms(x, state[p + "ln_f.weight"])
    head = state[p + "wte.weight"] if cfg.weight_tying else state[p + "ff_out.weight"]
    return x @ head.T


def test_reference_checkpoint_reproduces_reference_logits():
    model = load_policy(FIXTURE)
    expected = load_file(FIXTURE / "expected.safetensors")
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert logits.shape == expected["logits"].shape == (2, 40, 320)
    assert (logits - expected["logits"]).abs().max() < 1e-4


def test_save_load_round_trip_keeps_logits_and_key_names(tmp_path):
    model = load_policy(FIXTURE)
    model.save_pretrained(tmp_path / "copy")
    saved = load_file(tmp_path / "copy" / "model.safetensors")
    assert set(saved) == set(load_file(FIXTURE / "model.safetensors"))
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["model_type"] == "llada" and config["d_model"] == 64 and config["mask_token_id"] == 299
    again = load_policy(tmp_path / "copy")
    ids = torch.randint(0, 300, (3, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("tied,kv_heads", [(False, 2), (True, 4), (True, 1)])
def test_gqa_and_tied_head_match_plain_tensor_computation(tmp_path, tied, kv_heads):
    cfg = tiny_config(weight_tying=tied, n_kv_heads=kv_heads)
    build_policy(cfg, seed=3).save_pretrained(tmp_path)
    model = load_policy(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert ("model.transformer.ff_out.weight" in state) == (not tied)
    assert state["model.transformer.blocks.0.k_proj.weight"].shape == (kv_heads * 8, 32)
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        got = model(ids).logits
    assert (got - reference_forward(state, cfg, ids)).abs().max() < 1e-5


def test_sharded_checkpoint_loads(tmp_path):
    model = build_policy(tiny_config(), seed=1)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 48, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_policy(tmp_path)(ids).logits)


def _copy_fixture(tmp_path: Path) -> tuple[Path, dict]:
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder)
    return folder, load_file(folder / "model.safetensors")


def test_missing_key_is_named(tmp_path):
    folder, state = _copy_fixture(tmp_path)
    del state["model.transformer.blocks.1.up_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: model\.transformer\.blocks\.1\.up_proj\.weight"):
        load_policy(folder)


def test_wrong_key_and_wrong_shape_are_named(tmp_path):
    folder, state = _copy_fixture(tmp_path)
    state["model.transformer.blocks.0.w_in.weight"] = state.pop("model.transformer.blocks.0.ff_proj.weight")
    state["model.transformer.ln_f.weight"] = torch.ones(63)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_policy(folder)
    msg = str(err.value)
    assert "unexpected keys: model.transformer.blocks.0.w_in.weight" in msg
    assert "missing keys: model.transformer.blocks.0.ff_proj.weight" in msg
    assert "model.transformer.ln_f.weight (63,)" in msg


def test_broken_folders_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_policy(tmp_path / "nowhere")
    folder, _ = _copy_fixture(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        load_policy(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has neither model.safetensors"):
        load_policy(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_policy(folder)


def test_padding_is_invisible_to_the_model():
    model = load_policy(FIXTURE)
    ids = torch.randint(0, 300, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(ids).logits
        inside = model(padded, attention_mask=mask).logits[:, 5:]
    assert (alone - inside).abs().max() < 1e-5


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 300, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = load_policy(FIXTURE).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids).logits.logsumexp(-1).mean().backward()
        grads.append(model.model.transformer.blocks[0].q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_load_casts_weights():
    model = load_policy(FIXTURE, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randint(0, 300, (1, 8))).logits.dtype == torch.bfloat16
