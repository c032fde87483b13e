"""HQQ (half-quadratic quantization, calibration-free) with its default optimiser; groups along the input
dimension (axis=1) like AWQ. HQQ keeps a float zero point, not an integer one: noted in the table."""
import _common as c
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

a = c.args()
m, tok = c.load(a.model)
cfg = BaseQuantizeConfig(nbits=a.bits, group_size=a.group_size, axis=1)
with c.Timer() as t:
    for name, lin in list(m.model.layers.named_modules()):
        if isinstance(lin, torch.nn.Linear):
            w = lin.weight.data
            q = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
            lin.weight.data = q.dequantize().reshape(w.shape).to(w.dtype)
c.save(m, a.out)
c.report(t.seconds)
