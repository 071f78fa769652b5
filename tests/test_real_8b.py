"""The 8B policy, built on the meta device: LLaDA-8B's parameter count and key names."""
import torch

from pararl.models import LLaDAModelLM, llada_8b_config, parameter_count

# By hand, from d_model 4096, 32 layers, 32 heads (= 32 kv heads), mlp_hidden_size 12288, vocab and
# embedding 126464, no biases, untied output:
#   one block: q, k, v, attn_out 4 * 4096^2 = 67_108_864; ff_proj, up_proj, ff_out 3 * 4096 * 12288
#              = 150_994_944; attn_norm + ff_norm 2 * 4096 = 8_192; total 218_112_000
#   32 blocks: 6_979_584_000
#   wte 126464 * 4096 = 517_996_544; ff_out (head) the same; ln_f 4_096
#   total: 6_979_584_000 + 2 * 517_996_544 + 4_096 = 8_015_581_184
LLADA_8B_PARAMS = 8_015_581_184
# MMaDA-Parallel grows the embedding and the head to 134656 rows: + 2 * 8192 * 4096 = 67_108_864
MMADA_PARALLEL_8B_PARAMS = 8_082_690_048

BLOCK_KEYS = ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


def test_8b_config_on_meta_has_llada_8b_parameters_and_key_names():
    config = llada_8b_config()
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    assert sum(p.numel() for p in model.parameters()) == LLADA_8B_PARAMS == parameter_count(config)
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    expected |= {f"model.transformer.blocks.{i}.{name}.weight" for i in range(32) for name in BLOCK_KEYS}
    state = model.state_dict()
    assert set(state) == expected
    assert tuple(state["model.transformer.wte.weight"].shape) == (126464, 4096)
    assert tuple(state["model.transformer.blocks.31.ff_proj.weight"].shape) == (12288, 4096)
    assert tuple(state["model.transformer.blocks.0.ff_out.weight"].shape) == (4096, 12288)

    grown = llada_8b_config(embedding_size=134656)
    with torch.device("meta"):
        assert sum(p.numel() for p in LLaDAModelLM(grown).parameters()) == MMADA_PARALLEL_8B_PARAMS == parameter_count(grown)


def test_parameter_count_follows_the_config_fields():
    from pararl.models import LLaDAConfig

    for fields in (dict(n_kv_heads=2), dict(include_bias=True), dict(include_qkv_bias=True, weight_tying=True)):
        config = LLaDAConfig(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=48, vocab_size=50, embedding_size=56, **fields)
        with torch.device("meta"):
            assert parameter_count(config) == sum(p.numel() for p in LLaDAModelLM(config).parameters()), fields
