"""Learning-curve plots: EMA smoothing and chained runs (SFT then DPO) on one step axis."""
import polars as pl
import pytest

from ldpipe.analysis.curves import chain_curves, ema, plot_learning_curves


def _rows(run_id, steps, logps, rtype="chosen"):
    return [{"run_id": run_id, "step": s, "response_type": rtype, "mean_logp": v, "mean_delta": v - logps[0]}
            for s, v in zip(steps, logps)]


def test_chain_puts_phases_on_one_axis_relative_to_the_first_run():
    curves = pl.DataFrame(_rows("e.sft", [0, 10, 20], [-30.0, -25.0, -20.0])
                          + _rows("e.dpo", [0, 5, 10], [-20.0, -22.0, -26.0]))
    out, bounds = chain_curves(curves, [("e.sft", "sft"), ("e.dpo", "dpo")])
    assert bounds == {0: "sft", 20: "dpo"}
    assert out["step"].to_list() == [0, 10, 20, 20, 25, 30]
    # change since the SFT's first evaluation, continuous across the boundary (DPO starts where SFT ended)
    assert out["mean_delta"].to_list() == [0.0, 5.0, 10.0, 10.0, 8.0, 4.0]
    with pytest.raises(ValueError, match="e.ipo"):
        chain_curves(curves, [("e.sft", "sft"), ("e.ipo", "ipo")])


def test_ema_and_plot():
    assert ema([0.0, 10.0, 10.0], 0.9) == pytest.approx([0.0, 1.0, 1.9])
    curves = pl.DataFrame(_rows("e.sft", [0, 10, 20], [-30.0, -25.0, -20.0]))
    png = plot_learning_curves(curves, title="t", smooth=0.9, boundaries={10: "phase 2"})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
