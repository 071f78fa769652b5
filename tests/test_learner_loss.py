"""The clipped surrogate and KL: a hand computation, the plain policy gradient at ratio 1, KL properties."""
import math

import pytest
import torch

from learner.loss import KL_ESTIMATORS, LossSettings, Normalizer, clipped_surrogate

LOGP = [[-1.0, -2.0, 0.0], [-0.5, -1.5, -3.0]]
OLD = [[-1.2, -1.9, 0.0], [-0.5, -0.9, -3.1]]
REF = [[-1.1, -2.0, 0.0], [-0.4, -1.5, -2.0]]
MASK = [[True, True, False], [True, True, True]]
ADV = [1.0, -2.0]


def hand_loss(aggregation, eps_low=0.2, eps_high=0.28, beta=0.1):
    """Plain floats: per token -min(r A, clip(r) A) + beta (exp(d) - d - 1), then the chosen mean."""
    per_seq, tokens = [], 0
    for i in range(2):
        terms = []
        for j in range(3):
            if not MASK[i][j]:
                continue
            r = math.exp(LOGP[i][j] - OLD[i][j])
            pg = -min(r * ADV[i], min(max(r, 1 - eps_low), 1 + eps_high) * ADV[i])
            d = REF[i][j] - LOGP[i][j]
            terms.append(pg + beta * (math.exp(d) - d - 1))
        per_seq.append(terms)
        tokens += len(terms)
    if aggregation == "token":
        return sum(sum(t) for t in per_seq) / tokens
    return sum(sum(t) / len(t) for t in per_seq) / len(per_seq)


WINDOW = [[0, 1, -1], [0, 0, 1]]  # the replay window of each token: rows (0,0) (0,1) (1,0) (1,1)


def hand_row_loss(eps_low=0.2, eps_high=0.28, beta=0.1):
    """TraceRL's: the mean over (trajectory, window) rows of each row's mean term."""
    rows = {}
    for i in range(2):
        for j in range(3):
            if MASK[i][j]:
                r = math.exp(LOGP[i][j] - OLD[i][j])
                pg = -min(r * ADV[i], min(max(r, 1 - eps_low), 1 + eps_high) * ADV[i])
                d = REF[i][j] - LOGP[i][j]
                rows.setdefault((i, WINDOW[i][j]), []).append(pg + beta * (math.exp(d) - d - 1))
    return sum(sum(t) / len(t) for t in rows.values()) / len(rows)


def test_row_aggregation_equals_hand_computation():
    logp, old, ref, adv, mask = tensors()
    settings = LossSettings(eps_low=0.2, eps_high=0.28, beta=0.1, kl_estimator="k3", aggregation="row")
    loss, _ = clipped_surrogate(logp, old, ref, adv, mask, mask.double(), settings, Normalizer(5, 2, 4),
                                window=torch.tensor(WINDOW))
    assert float(loss) == pytest.approx(hand_row_loss(), abs=1e-12)
    assert float(loss) != pytest.approx(hand_loss("token"), abs=1e-3) and float(loss) != pytest.approx(hand_loss("sequence"), abs=1e-3)
    with pytest.raises(ValueError, match="needs each token's replay window"):
        clipped_surrogate(logp, old, ref, adv, mask, mask.double(), settings, Normalizer(5, 2, 4))


def tensors():
    return (torch.tensor(LOGP, dtype=torch.float64), torch.tensor(OLD, dtype=torch.float64),
            torch.tensor(REF, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK))


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_loss_equals_hand_computation(aggregation):
    logp, old, ref, adv, mask = tensors()
    settings = LossSettings(eps_low=0.2, eps_high=0.28, beta=0.1, kl_estimator="k3", aggregation=aggregation)
    loss, stats = clipped_surrogate(logp, old, ref, adv, mask, mask.double(), settings, Normalizer(5, 2))
    assert float(loss) == pytest.approx(hand_loss(aggregation), abs=1e-12)
    # Ratios: e^0.2 (kept: A > 0, 1.2214 < 1.28), e^-0.1, e^0, e^-0.6 (A < 0 and below 0.8: clipped), e^0.1.
    assert float(stats["clipped"]) == 1 and float(stats["tokens"]) == 5
    assert float(stats["ratio_max"]) == pytest.approx(math.exp(0.2))
    assert float(stats["ratio_min"]) == pytest.approx(math.exp(-0.6))


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_gradient_at_ratio_one_is_the_plain_policy_gradient(aggregation):
    torch.manual_seed(0)
    theta = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, 3, 3, dtype=torch.float64)
    _, _, _, adv, mask = tensors()

    def logp_of(t):  # any differentiable per-token log-prob
        return torch.log_softmax(features @ t[..., None], dim=1).squeeze(-1)

    logp = logp_of(theta)
    settings = LossSettings(beta=0.0, aggregation=aggregation)
    loss, stats = clipped_surrogate(logp, logp.detach(), None, adv, mask, mask.double(), settings, Normalizer(5, 2))
    (grad,) = torch.autograd.grad(loss, theta)
    assert float(stats["ratio_min"]) == float(stats["ratio_max"]) == 1.0
    # Plain policy gradient, same aggregation: -sum_i A_i sum_j c_ij grad logp_ij.
    counts = mask.sum(1, keepdim=True).double()
    c = mask.double() / 5 if aggregation == "token" else mask.double() / (counts * 2)
    (expected,) = torch.autograd.grad(-(adv[:, None] * c * logp_of(theta)).sum(), theta)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_is_zero_when_policy_equals_reference(name):
    logp, old, _, adv, mask = tensors()
    settings = LossSettings(beta=0.5, kl_estimator=name)
    _, stats = clipped_surrogate(logp, old, logp.clone(), adv, mask, mask.double(), settings, Normalizer(5, 2))
    assert float(stats["kl"]) == 0.0


def test_k3_is_non_negative_and_the_estimators_match_their_formulas():
    d = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    assert (KL_ESTIMATORS["k3"](d) >= 0).all()
    torch.testing.assert_close(KL_ESTIMATORS["k1"](d), -d)
    torch.testing.assert_close(KL_ESTIMATORS["k2"](d), d * d / 2)
    torch.testing.assert_close(KL_ESTIMATORS["k3"](d), torch.exp(d) - d - 1)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: k1, k2, k3"):
        LossSettings(kl_estimator="k4")
    with pytest.raises(ValueError, match="known: row, sequence, token"):
        LossSettings(aggregation="batch")
