"""Two learner ranks (Ray actors, ZeRO-2, gloo) on two halves of a batch take the step one rank takes on all of it."""
import pytest

from cluster.learner_group import LearnerGroup
from learner.checkpoint import RunState
from learner.trainer import Learner
from learner.weights import iter_weight_buckets
from pararl.models import load_policy
from tests.learner_tiny import FMT, learner_config, policy_folder, sampled_batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return policy_folder(tmp_path_factory.mktemp("dist"), seed=9)


def test_two_zero2_ranks_on_halves_equal_one_rank_on_the_whole(ray_local, folder, tmp_path):
    batch = sampled_batch(folder, prompts=4, group=2, seed=1)
    initial = load_policy(folder).state_dict()
    # Two ranks: 4 trajectories each per optimizer step (2 micro-batches of 2); one rank: all 8 (2 of 4).
    group = LearnerGroup(learner_config(zero_stage=2, micro_batch_size=2, grad_accumulation=2), folder, FMT, world=2)
    try:
        metrics_two = group.train(batch)
        hashes = group.weights_hashes()
        two = {n: t for bucket in group.weight_buckets(1 << 16) for n, t in bucket}
        saved = group.save_checkpoint(RunState(step=1), str(tmp_path / "run"))
    finally:
        group.shutdown()
    assert hashes[0] == hashes[1], "data-parallel ranks must hold identical weights"
    assert (tmp_path / "run" / "latest").read_text() == "step-00000001" and saved.endswith("step-00000001")

    one = Learner(learner_config(zero_stage=2, micro_batch_size=4, grad_accumulation=2), folder, FMT)
    metrics_one = one.train_batch(batch)
    whole = {n: t for bucket in iter_weight_buckets(one.engine, 1 << 16) for n, t in bucket}
    assert max((whole[k] - initial[k]).abs().max().item() for k in whole) > 1e-3, "the update must move the weights"
    diff = max((whole[k] - two[k]).abs().max().item() for k in whole)
    assert diff < 1e-5, f"two ranks differ from one rank by {diff}"
    for key in ("loss", "kl", "clip_fraction", "ratio_max", "tokens"):
        assert metrics_two[key] == pytest.approx(metrics_one[key], abs=1e-5)
