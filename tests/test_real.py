"""Slow: the real SmolLM2-135M (embedded GGUF), INT4 g64. AWQ's wiki perplexity must beat RTN's.
Minutes on a 2-core CPU; CI runs it. Skip with -m "not slow"."""

import pytest
import torch

from salience import api
from salience.awq import SearchConfig
from salience.data import calibration_rows, load_text
from salience.models import load_fp
from salience.quant import QuantConfig

pytestmark = pytest.mark.slow


def test_smollm2_awq_beats_rtn_g64():
    m, tok, _ = load_fp("smollm2", dtype=torch.bfloat16)
    qcfg = QuantConfig(4, 64)
    windows = 32
    rtn = api.clone(m)
    api.fake_quantize(rtn, qcfg, "rtn", progress=False)
    ppl_rtn = api.ppl(rtn, tok, "wiki", max_windows=windows, progress=False)
    del rtn
    rows = calibration_rows(tok, load_text("lee"), n_rows=64, seqlen=512)
    api.fake_quantize(m, qcfg, "awq", rows, SearchConfig(), progress=False)
    ppl_awq = api.ppl(m, tok, "wiki", max_windows=windows, progress=False)
    print(f"wiki ppl ({windows} windows): RTN {ppl_rtn:.3f}  AWQ {ppl_awq:.3f}")
    assert ppl_awq < ppl_rtn


def test_discovery_on_real_smollm2_matches_the_table():
    """On the real model (GQA: no v -> o group), discovery finds the table's applicable groups."""
    from salience.arch import arch_for, get_module
    from salience.discover import discover, group_key
    from salience.quantize import _group_applies

    m, _, _ = load_fp("smollm2", dtype=torch.float32)
    arch = arch_for(m.config)
    block = get_module(m, arch.layers)[0]
    table = {group_key(g) for g in arch.groups if _group_applies(block, g)}
    found = discover(m)
    assert {group_key(g) for g in found.groups} == table and not found.norm_plus_one
