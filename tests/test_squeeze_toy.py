"""The paper's squeezing toy (one softmax step): the claims of docs/glossary.md#squeezing and the analytic logit change."""
from __future__ import annotations

import numpy as np
import pytest

from ldpipe.analysis.squeeze_toy import PANELS, plot_panel, run_panel, summary


def test_negative_gradient_on_flat_pi_lowers_the_pushed_class():
    r = run_panel("B")
    assert r["minus_class"] == 42 and r["minus_falls"]
    assert r["pi1"][42] < r["pi0"][42]
    assert r["star_rises"]
    # on a flat pi the freed mass spreads: almost nothing else falls
    assert r["frac_others_fall"] < 0.2


def test_negative_gradient_on_a_valley_of_a_peaky_pi_squeezes_into_the_argmax():
    r = run_panel("D0")
    assert r["pi0"][r["minus_class"]] < 1e-6  # ybar sits in a valley
    assert r["star_rises"] and r["delta_pi_star"] > 0.1
    assert r["frac_others_fall"] > 0.9
    assert r["only_argmax_rises"]
    # the same push on the peak class C also squeezes into y*
    c = run_panel("C")
    assert c["minus_falls"] and c["star_rises"] and c["only_argmax_rises"]


@pytest.mark.parametrize("kind", ["B", "C", "D0", "E"])
def test_logit_change_follows_pi_for_a_negative_gradient(kind):
    """Linear head: Delta z_k = eta ||x||^2 pi_k for k != ybar and eta ||x||^2 (pi_ybar - 1) for ybar."""
    r = run_panel(kind)
    dz = r["z1"] - r["z0"]
    ybar = r["minus_class"]
    others = np.arange(r["n_classes"]) != ybar
    scale = r["eta_minus"] * r["x_norm_sq"]
    expected = scale * r["pi0"]
    expected[ybar] = scale * (r["pi0"][ybar] - 1)
    # z1 - z0 loses ~1e-15 * |z| to cancellation, so compare with an absolute floor
    np.testing.assert_allclose(dz, expected, rtol=1e-9, atol=1e-12)
    visible = others & (expected > 1e-10)
    assert visible.sum() > 10 and (dz[visible] > 0).all() and dz[ybar] < 0
    # the most likely classes gain the most logit
    assert int(np.argmax(dz)) == r["y_star"]


def test_panel_d_equal_steps_cancel_the_pi_terms():
    """D (the toy's setting D): eta_minus == eta_plus on one x, so only z_25 rises and z_42 falls, by eta ||x||^2."""
    r = run_panel("D")
    dz = r["z1"] - r["z0"]
    scale = r["eta_plus"] * r["x_norm_sq"]
    expected = np.zeros(r["n_classes"])
    expected[25], expected[42] = scale, -scale
    np.testing.assert_allclose(dz, expected, atol=1e-9)
    assert r["minus_falls"] and r["delta_pi"][25] > 0 and r["n_rise"] == 1


def test_positive_gradient_raises_its_class():
    r = run_panel("A")
    assert r["plus_class"] == 21
    assert r["delta_pi"][21] > 0 and r["n_rise"] == 1


def test_deterministic_and_seed_dependent():
    a, b = run_panel("C"), run_panel("C")
    for key in ("pi0", "pi1", "z0", "z1"):
        np.testing.assert_array_equal(a[key], b[key])
    other = run_panel("C", seed=1)
    assert not np.allclose(a["pi0"], other["pi0"])
    with pytest.raises(ValueError, match="unknown panel"):
        run_panel("Z")


def test_summary_and_plot():
    rows = summary()
    assert [r["panel"] for r in rows] == list(PANELS)
    assert all(isinstance(r["frac_others_fall"], float) for r in rows)
    e = next(r for r in rows if r["panel"] == "E")
    assert e["n_classes"] == 1000 and e["only_argmax_rises"]
    png = plot_panel(run_panel("D0"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
