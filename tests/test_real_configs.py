"""The 8B cluster configs load through the run-config schema, and the README's memory table is theirs."""
from pathlib import Path

import pytest

from cluster.memory import estimate_run, markdown_table, one_node, preset_shapes
from cluster.placement import required
from cluster.run_config import load_run_config
from pararl.models import llada_8b_config

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("preset", ["mmada-parallel-a", "mmada-parallel-m"])
def test_8b_config_loads_and_fits_80gb_gpus(preset):
    cfg = load_run_config(ROOT / "configs" / f"{preset}-8b.yaml")
    lc, c, r, s = cfg.learner, cfg.cluster, cfg.reward, cfg.sampler
    assert (lc.zero_stage, lc.precision, lc.device, lc.gradient_checkpointing, lc.reference_offload) == (3, "bf16", "cuda", True, True)
    assert (lc.lr, lc.eps_low, lc.eps_high, lc.beta, lc.kl_estimator, lc.kl_reference) == (1e-6, 0.2, 0.2, 0.01, "k3", "reference")
    assert (cfg.data.group_size, r.sampled_steps, s.steps, s.text_len, s.cfg_image) == (8, 3, 128, 256, 4.0)
    assert c.address == "auto" and c.rollout_gpus == 1 and c.learner_gpus == 1 and r.gpus_per_replica == 1
    assert required(c, r)["GPU"] == 26
    unit = lc.micro_batch_size * lc.grad_accumulation * c.learner_ranks
    assert cfg.data.prompts_per_step * cfg.data.group_size == unit, "one optimizer step uses the whole batch"
    assert cfg.reward.stats_file.endswith("reward_stats.json")

    out, span, vocab, codebook = preset_shapes(preset, s.text_len)
    assert vocab == (126356 if preset == "mmada-parallel-a" else 126464)
    estimates, _, shapes = estimate_run(cfg, llada_8b_config(embedding_size=134656), out, span, text_vocab=vocab,
                                        codebook=codebook)
    assert shapes.params == 8_082_690_048
    assert all(e.total < 80e9 * 0.9 for e in estimates), [e.line() for e in estimates]
    doc = (ROOT / "docs" / "gpu-cluster.md").read_text()
    assert markdown_table(estimates) in doc, "docs/gpu-cluster.md: rerun python -m cluster.memory on the config"
    assert max(e.total for e in estimates) > 40e9  # 40 GB GPUs do not fit, as the page says


@pytest.mark.parametrize("preset", ["mmada-parallel-a", "mmada-parallel-m"])
def test_the_colocated_8b_config_is_the_cluster_one_on_one_node_of_8_gpus(preset):
    base = load_run_config(ROOT / "configs" / f"{preset}-8b.yaml")
    cfg = load_run_config(ROOT / "configs" / f"{preset}-8b-colocated.yaml")
    assert cfg.sampler == base.sampler and cfg.reward.models == base.reward.models
    assert (cfg.learner.lr, cfg.learner.beta, cfg.learner.zero_stage, base.learner.zero_stage) == (1e-6, 0.01, 2, 3)
    c = cfg.cluster
    assert c.colocate and c.rollout_workers == c.learner_ranks == 8 and required(c, cfg.reward)["GPU"] <= 8
    unit = cfg.learner.micro_batch_size * cfg.learner.grad_accumulation * c.learner_ranks
    assert cfg.data.prompts_per_step * cfg.data.group_size == unit
    out, span, vocab, codebook = preset_shapes(preset, cfg.sampler.text_len)
    estimates, host, _ = estimate_run(cfg, llada_8b_config(embedding_size=134656), out, span, text_vocab=vocab,
                                      codebook=codebook)
    fits, why = one_node(cfg, estimates, 80e9, 8)
    assert fits, why
    assert [e.actor for e in estimates] == ["colocated rank, training", "colocated rank, sampling", "reward replica"]
    assert "fp32 master + Adam" not in estimates[1].parts, "it is in host memory while the rank samples"
    doc = (ROOT / "docs" / "gpu-cluster.md").read_text()
    assert markdown_table(estimates) in doc, "docs/gpu-cluster.md: rerun python -m cluster.memory on the config"


def test_the_unigrpo_configs_load_and_the_8b_one_fits_80gb_gpus(tmp_path):
    cfg = load_run_config(ROOT / "configs" / "mmada-8b-unigrpo.yaml")
    lc, r = cfg.learner, cfg.reward
    assert (lc.logprob_estimator, lc.mask_structure, lc.updates_per_batch, lc.beta, lc.image_weight) == (
        "random_mask", "stratified", 2, 0.04, 0.1)
    assert set(r.tasks) == {"t2i", "understand", "reason"} and set(r.text_models) == {"answer", "format"}
    assert required(cfg.cluster, r)["GPU"] == 26
    out, span, vocab, codebook = preset_shapes("mmada-parallel-m", cfg.sampler.text_len)
    estimates, _, _ = estimate_run(cfg, llada_8b_config(embedding_size=134656), out, span, text_vocab=vocab,
                                   codebook=codebook)
    assert all(e.total < 80e9 * 0.9 for e in estimates), [e.line() for e in estimates]
    from shapeworld.default_run import split_world

    path, rest, world = split_world(ROOT / "configs" / "unigrpo-world.yaml", ["seed=2"], tmp_path)
    world_cfg = load_run_config(path, rest)
    assert world == {"task_shares": {"t2i": 0.2, "understand": 0.2, "reason": 0.2}} and world_cfg.seed == 2
    assert set(world_cfg.reward.tasks) == {"generate", "edit", "t2i", "understand", "reason"}


def test_the_memory_table_takes_overrides_and_refuses_a_bad_key_in_one_line(capsys):
    from cluster.memory import main

    main([str(ROOT / "configs" / "mmada-parallel-m-8b-colocated.yaml"), "learner.lora.enabled=true"])
    lora = capsys.readouterr().out
    assert "| colocated rank, training | 15.1 | 0.1 | 0.0 |" in lora  # the adapters' optimizer state and gradients
    with pytest.raises(SystemExit, match="^error: unknown config key 'bogus'$"):
        main([str(ROOT / "configs" / "mmada-parallel-m-8b.yaml"), "bogus=1"])
    with pytest.raises(SystemExit, match="sampler.preset is None: the table is for the released 8B layouts"):
        main([str(ROOT / "configs" / "default.yaml")])
