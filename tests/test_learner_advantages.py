"""Group advantages: population std, Dr. GRPO, constant groups counted and optionally dropped."""
import pytest
import torch

from learner.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, register_advantage


def test_grpo_uses_population_std_per_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.5, 0.9])
    group = torch.tensor([7, 7, 7, 2, 2, 2])  # any ids, any order
    adv = compute_advantages(rewards, group, "grpo", eps=0.0)
    g1 = torch.tensor([1.0, 2.0, 3.0])
    expected1 = (g1 - g1.mean()) / g1.std(unbiased=False)
    g2 = torch.tensor([0.5, 0.5, 0.9])
    expected2 = (g2 - g2.mean()) / g2.std(unbiased=False)
    torch.testing.assert_close(adv.values, torch.cat([expected1, expected2]))
    assert adv.constant_groups == 0 and adv.groups == 2 and adv.keep.all()


def test_drgrpo_does_not_divide_by_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0])
    adv = compute_advantages(rewards, torch.tensor([0, 0, 1, 1]), "drgrpo")
    torch.testing.assert_close(adv.values, torch.tensor([-0.5, 0.5, -1.0, 1.0]))


def test_constant_groups_are_zero_counted_and_optionally_dropped():
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.1, 0.4, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    kept = compute_advantages(rewards, group)
    assert kept.constant_groups == 2 and kept.keep.all()
    assert (kept.values[[0, 1, 2, 5, 6]] == 0).all() and (kept.values[[3, 4]] != 0).all()
    dropped = compute_advantages(rewards, group, drop_constant_groups=True)
    assert dropped.keep.tolist() == [False, False, False, True, True, False, False]


def test_registry_and_bad_input():
    @register_advantage("sign")
    def sign(rewards, group, eps):
        return torch.sign(rewards - 0.5)

    try:
        adv = compute_advantages(torch.tensor([0.2, 0.9]), torch.tensor([0, 0]), "sign")
        assert adv.values.tolist() == [-1.0, 1.0]
    finally:
        ADVANTAGE_ESTIMATORS.remove("sign")
    with pytest.raises(ValueError, match="advantage estimator 'grpo' is already registered"):
        register_advantage("grpo")(sign)  # a plugin never silently replaces a built-in
    with pytest.raises(ValueError, match="known: drgrpo, grpo"):
        compute_advantages(torch.tensor([1.0]), torch.tensor([0]), "ppo")
    with pytest.raises(ValueError, match="non-finite rewards at trajectories \\[1\\]"):
        compute_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        compute_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0]))
