"""pararl plan: the real code at the 8B shapes on fake tensors (no weights, no GPU)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from cluster.plan.actors import ActorPlan
from cluster.plan.command import GiB, fits, plan_main
from cluster.plan.fake import DEVICE, TRAIN_DEVICE, HostRealMode, build_fake, measure
from cluster.run_config import load_run_config
from pararl.models import LLaDAConfig, LLaDAModelLM, llada_8b_config, parameter_count
from pararl.testing import PLAN_8B_CONFIGS, write_8b_config


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {p: write_8b_config(root / p, p) for p in ("mmada-parallel-a", "mmada-parallel-m")}


@pytest.mark.parametrize("path", PLAN_8B_CONFIGS)
def test_every_8b_config_is_planned_whole_and_its_estimate_agrees(path, released, tmp_path):
    """Every actor's unit at 8B shapes (32 layers, the 134,656-row head, 2.5k-token edits): the rollout
    worker's sampling step and log-probs, the learner's micro-batch with its backward, both phases of a
    colocated rank, the reward replica's decode and CLIP forward. cluster.memory's estimate (what
    pararl doctor reads before Ray starts) is within 10% of the measured plan for every rank."""
    preset = load_run_config(path).sampler.preset
    args = _args(path, released[preset], 80.0, tmp_path)
    args.flops = False
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = plan_main(args)
    assert code == 0, out.getvalue()
    actors = {a["actor"]: a for a in json.loads((tmp_path / "plan.json").read_text())["actors"]}
    ranks = ["colocated rank, training", "colocated rank, sampling"] if "colocated" in path else ["learner rank", "rollout worker"]
    assert sorted(actors) == sorted(ranks + ["reward replica"])
    for name in ranks:
        a = actors[name]
        total = sum(a["measured"].values()) + sum(a["analytic"].values())
        assert a["measured"] and not a["unmeasured"]
        assert total == pytest.approx(a["estimate"], rel=0.10), (name, total / GiB, a["estimate"] / GiB)
    sampling = actors[ranks[1]]["measured"]
    assert sampling["weights"] == 2 * 8_082_690_048 and 2 * GiB < sampling["sampling step"] < 20 * GiB
    reward = actors["reward replica"]
    assert reward["measured"]["reward forward"] > 0  # the CLIP ViT-L/14 forward over the decoded batch
    assert reward["unmeasured"] == ([] if preset == "mmada-parallel-m" else [
        "the VQ decode (no vqvae/config.json: pass the released folder as model=)"])


def test_the_unigrpo_config_is_planned_whole_and_an_actor_that_does_not_fit_is_named_with_its_gap(released, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = plan_main(_args("configs/mmada-8b-unigrpo.yaml", released["mmada-parallel-m"], 24.0, tmp_path))
    text = out.getvalue()
    assert code == 2
    assert "PROBLEM  learner rank does not fit: needs" in text and "GiB short" in text
    assert "ok       rollout worker fits" in text
    assert "100 steps on H100" in text
    assert "a checkpoint keeps each rollout queued ahead (cluster.max_staleness 0): " in text and "KiB a trajectory" in text


def test_fits_names_the_actor_and_the_gap_in_gib():
    a = ActorPlan("rollout worker", measured={"weights": 30 * GiB}, analytic={"CUDA slack": 2 * GiB}, share=0.5)
    ok, line = fits(a, 40.0)
    assert not ok and line == "rollout worker does not fit: needs 32.0 GiB, its 0.5 GPU has 20.0 GiB, 12.0 GiB short"
    assert fits(a, 80.0)[0]


def _args(config, model, gpu, tmp_path):
    import argparse

    return argparse.Namespace(config=config, overrides=[f"model={model}"], gpu_memory_gb=gpu, flops=True, mfu=0.35,
                              json=str(tmp_path / "plan.json"))


def _tiny() -> LLaDAConfig:
    return LLaDAConfig(d_model=128, n_heads=4, n_layers=3, mlp_hidden_size=384, vocab_size=2000, embedding_size=2048)


def _step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    out = model(ids.to(next(model.parameters()).device), heads=[(slice(64, 192), slice(0, 2000)), (slice(192, 256), slice(1500, 2048))])
    loss = sum(h.float().log_softmax(-1).mean() for h in out.heads)
    loss.backward()


def test_the_fake_peak_of_a_learner_step_equals_the_real_step_measured_on_cpu():
    """The same forward and backward (gradient checkpointing on, span heads) once on real CPU tensors and
    once on the plan's meta tensors (MemTracker on the real run counts real allocations): the peaks agree
    within 1% (the same kernels keep the same tensors: flash attention's output and log-sum-exp)."""
    ids = torch.randint(0, 2000, (2, 256))
    real = LLaDAModelLM(_tiny()).to(torch.bfloat16).train()
    real.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tracker = MemTracker()
    tracker.track_external(real)
    with tracker:
        _step(real, ids)
    real_peak = float(list(tracker.get_tracker_snapshot("peak").values())[0]["Total"])
    mode = HostRealMode()
    fake = build_fake(lambda: LLaDAModelLM(_tiny()), mode, TRAIN_DEVICE, torch.bfloat16).train()
    fake.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measured = measure(lambda: _step(fake, ids), mode, TRAIN_DEVICE, [fake], wrap=False)
    assert measured.total == pytest.approx(real_peak, rel=0.01)


def test_the_flops_of_an_8b_forward_equal_the_analytic_count():
    """2 x (parameters outside the embedding) x tokens + 4 x layers x d_model x L^2 per row (QK^T and AV),
    for two rows of 2,502 tokens with the full head, within 2%."""
    config = llada_8b_config(embedding_size=134656)
    mode = HostRealMode()
    model = build_fake(lambda: LLaDAModelLM(config), mode, DEVICE, torch.bfloat16)
    rows, length = 2, 2502
    ids = torch.zeros(rows, length, dtype=torch.long)

    def forward() -> None:
        with torch.no_grad():
            model(ids.to(DEVICE))

    counted = measure(forward, mode, DEVICE, [model], memory=False).flops
    matmul_params = parameter_count(config) - config.output_size * config.d_model  # the embedding is a lookup
    analytic = 2 * matmul_params * rows * length + 4 * config.n_layers * config.d_model * length**2 * rows
    assert counted == pytest.approx(analytic, rel=0.02)
