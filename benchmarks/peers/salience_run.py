"""salience AWQ (default settings; --rounding gptq: the opt-in GPTQ rounding, damping SearchConfig's default;
--rounding tune: the opt-in block-wise tuning, SearchConfig's steps and rows; --search-damp: the search's ridge,
default SearchConfig's) or RTN, in the project's own environment."""
import sys
from pathlib import Path

import _common as c
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from salience import api  # noqa: E402
from salience.awq import SearchConfig, damp_for  # noqa: E402
from salience.quant import QuantConfig  # noqa: E402

a = c.args({"--method": {"choices": ["awq", "rtn"], "default": "awq"},
            "--rounding": {"choices": ["nearest", "gptq", "tune"], "default": "nearest"},
            "--search-damp": {"type": float, "default": None}})
m, tok = c.load(a.model)
rows = c.rows(a.rows) if a.method == "awq" else None
scfg = SearchConfig(rounding=a.rounding, search_damp=a.search_damp)  # None: damp_for's default
with c.Timer() as t:
    api.fake_quantize(m, QuantConfig(a.bits, a.group_size), a.method, rows, scfg, dtype=torch.bfloat16)
c.save(m, a.out)
c.report(t.seconds, **({"rounding": scfg.rounding, "gptq_damp": scfg.gptq_damp, "tune_steps": scfg.tune_steps,
                        "tune_rows": scfg.tune_rows, "propagate": scfg.propagate,
                        "search_damp": damp_for(scfg, a.bits)} if a.method == "awq" else {}))
