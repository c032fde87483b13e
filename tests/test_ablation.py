"""benchmarks/ablation.py's held-out selection: the variant named, and the one choice across runs."""

import importlib.util
from pathlib import Path

import pytest

from salience.awq import damp_for

spec = importlib.util.spec_from_file_location("ablation", Path(__file__).parents[1] / "benchmarks" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def _run(sel: dict[str, float], wiki: float = 25.0) -> dict:
    return {"model": "m", "group_size": 64, "variants": [{"variant": v, "select_ppl": p, "ppl": wiki}
                                                        for v, p in sel.items()]}


def test_best_on_selection_ignores_the_evaluation():
    res = [{"variant": "a", "select_ppl": 30.0, "ppl": 20.0}, {"variant": "b", "select_ppl": 29.0, "ppl": 25.0}]
    assert ablation.best_on_selection(res)["variant"] == "b"
    with pytest.raises(ValueError):
        ablation.best_on_selection([])


def test_choose_across_mean_relative_improvement():
    base = ablation.DEFAULT
    # model 1: x is 10% better than the default, y 2%; model 2: x 4% worse, y 6% better -> means 3% and 4%
    runs = [_run({base: 100.0, "x": 90.0, "y": 98.0}), _run({base: 50.0, "x": 52.0, "y": 47.0, "z": 1.0})]
    best, mean = ablation.choose_across(runs)
    assert best == "y"
    assert set(mean) == {base, "x", "y"}  # z: not in every run
    assert mean[base] == 0 and mean["x"] == pytest.approx(0.03) and mean["y"] == pytest.approx(0.04)
    with pytest.raises(ValueError, match="baseline"):
        ablation.choose_across([_run({"x": 1.0})])


def test_default_variant_is_the_default_search():
    shipped = ablation.VARIANTS[ablation.SHIPPED]  # the ablation is at 4 bits
    assert shipped == ablation.SearchConfig(search_damp=damp_for(ablation.SearchConfig(), 4))
    assert ablation.VARIANTS[ablation.DEFAULT] == ablation.SearchConfig(search_damp=0.0)
    assert ablation.NOT_HELD_OUT >= {ablation.CALIB, ablation.EVAL}


def test_resume_checks_the_settings(tmp_path, monkeypatch):
    import argparse
    import json
    monkeypatch.setattr(ablation, "RESULTS", tmp_path)
    a = argparse.Namespace(model="m", group_size=64, rows=64, windows=64, select_text="mobydick", select_windows=32,
                           tag="t", calib=["lee"])
    assert ablation.previous_run(a) is None
    near = dict(ablation.VARIANTS[ablation.DEFAULT].__dict__, gptq_damp=123.0)  # unused by nearest rounding
    saved = {**vars(a), "fp": 1.0, "fp_select": 2.0, "rtn": 3.0, "rtn_select": 4.0,
             "variants": [{"variant": ablation.DEFAULT, "config": near, "ppl": 2.0, "select_ppl": 3.0}]}
    (tmp_path / "ablation-m-g64-t.json").write_text(json.dumps(saved))
    assert ablation.previous_run(a)["variants"][0]["ppl"] == 2.0
    a.select_windows = 64
    with pytest.raises(SystemExit, match="select_windows"):
        ablation.previous_run(a)


def test_calibration_spread_and_evaluation_text():
    import argparse
    assert ablation.spread([25.0, 25.5, 24.5]) == pytest.approx(1.0 / 24.5)
    one = argparse.Namespace(calib=["lee"])
    assert ablation.eval_source(one) == ablation.EVAL
    # several calibrations (wiki-calib among them): evaluated on the wiki articles none of them holds
    assert ablation.eval_source(argparse.Namespace(calib=["lee", "wiki-calib"])) == "wiki-eval"
