"""Losses on summed log-probs: values against the formulas in plain floats, gradient directions, limits."""
import math

import pytest
import torch

from ldpipe.training.losses import dpo_loss, ipo_loss, sft_loss

torch.set_num_threads(1)

# Two pairs: policy and reference log pi of chosen and rejected (summed over tokens, nats).
POL_C, POL_R = [-10.0, -20.0], [-12.0, -15.0]
REF_C, REF_R = [-11.0, -18.0], [-11.5, -16.0]


def _t(xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


def _margins():
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(POL_C, POL_R, REF_C, REF_R)]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sft_loss_is_mean_summed_nll():
    assert sft_loss(_t([-3.0, -5.0, -10.0])).item() == pytest.approx((3 + 5 + 10) / 3)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_value_and_stats_match_formula(beta, eps):
    loss, stats = dpo_loss(_t(POL_C), _t(POL_R), _t(REF_C), _t(REF_R), beta, eps)
    ms = _margins()  # [1.5, -3.0]
    expected = sum(-(1 - eps) * _log_sigmoid(beta * m) - eps * _log_sigmoid(-beta * m) for m in ms) / len(ms)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    rc = [beta * (p - r) for p, r in zip(POL_C, REF_C)]
    rr = [beta * (p - r) for p, r in zip(POL_R, REF_R)]
    assert stats["rewards/chosen"].item() == pytest.approx(sum(rc) / 2)
    assert stats["rewards/rejected"].item() == pytest.approx(sum(rr) / 2)
    assert stats["rewards/margins"].item() == pytest.approx(sum(a - b for a, b in zip(rc, rr)) / 2)
    assert stats["rewards/accuracies"].item() == 0.5  # pair 0 wins (m=1.5), pair 1 loses (m=-3)


def test_cdpo_reduces_to_dpo_at_zero_smoothing_and_differs_otherwise():
    args = (_t(POL_C), _t(POL_R), _t(REF_C), _t(REF_R), 0.1)
    plain = dpo_loss(*args)[0].item()
    assert dpo_loss(*args, label_smoothing=0.0)[0].item() == plain
    assert dpo_loss(*args, label_smoothing=0.1)[0].item() != pytest.approx(plain)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = _t(POL_C, grad=True), _t(POL_R, grad=True)
    dpo_loss(pc, pr, _t(REF_C), _t(REF_R), 0.1)[0].backward()
    # gradient descent moves against the gradient: chosen up (grad < 0), rejected down (grad > 0)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # the push is beta * (1 - sigmoid(beta m)) / B: larger for the pair that is still mis-ordered
    for i, m in enumerate(_margins()):
        assert -pc.grad[i].item() == pytest.approx(0.1 * (1 - 1 / (1 + math.exp(-0.1 * m))) / 2)
    assert -pc.grad[1] > -pc.grad[0]


def test_rewards_are_zero_when_policy_equals_reference():
    x, y = _t(REF_C), _t(REF_R)
    loss, stats = dpo_loss(x, y, x.clone(), y.clone(), 0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert all(v.item() == 0.0 for v in stats.values())  # accuracy counts strict wins only


def test_ipo_value_and_minimum_at_half_inverse_beta():
    beta = 0.25
    loss, _ = ipo_loss(_t(POL_C), _t(POL_R), _t(REF_C), _t(REF_R), beta)
    assert loss.item() == pytest.approx(sum((m - 1 / (2 * beta)) ** 2 for m in _margins()) / 2)
    # margin exactly 1/(2 beta) = 2 nats: zero loss, zero gradient
    pc = _t([-8.0], grad=True)
    loss0, _ = ipo_loss(pc, _t([-10.0]), _t([-10.0]), _t([-10.0]), beta)
    loss0.backward()
    assert loss0.item() == 0.0 and pc.grad.item() == 0.0
    # past the target margin IPO pulls the chosen response back down (DPO never does)
    pc2 = _t([-5.0], grad=True)
    ipo_loss(pc2, _t([-10.0]), _t([-10.0]), _t([-10.0]), beta)[0].backward()
    assert pc2.grad.item() > 0


@pytest.mark.parametrize("call", [
    lambda: dpo_loss(_t([0.0]), _t([0.0]), _t([0.0]), _t([0.0]), 0.0),
    lambda: dpo_loss(_t([0.0]), _t([0.0]), _t([0.0]), _t([0.0]), 0.1, label_smoothing=0.5),
    lambda: ipo_loss(_t([0.0]), _t([0.0]), _t([0.0]), _t([0.0]), -1.0),
])
def test_bad_hyperparameters(call):
    with pytest.raises(ValueError):
        call()
