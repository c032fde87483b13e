"""GPTQModel (GPTQ, or its AWQ implementation with --method awq), asymmetric INT, group-wise, act-order
off, given exactly the orchestrator's calibration rows. Quantized linears become the tool's packed
modules; their dequantize_weight() is the weight its checkpoint holds."""
import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its default pool wants 2 loader workers out of them

import _common as c  # noqa: E402
import torch  # noqa: E402
from gptqmodel import GPTQModel, QuantizeConfig

a = c.args({"--method": {"choices": ["gptq", "awq"], "default": "gptq"}})
_, tok = c.load(a.model)  # for the saved-key set; GPTQModel loads its own copy below
qc = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=False, desc_act=False, offload_to_disk=False,
                    **({"method": "awq"} if a.method == "awq" else {}))
model = GPTQModel.load(a.model, qc, dtype=torch.bfloat16, device="cpu")
rows = c.rows(a.rows)
calib = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in rows]
with c.Timer() as t:
    model.quantize(calib, batch_size=1, calibration_sort=None)
hf = model.model
sd = {}
n = 0
for name, mod in hf.named_modules():
    if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight"):
        sd[name + ".weight"] = mod.dequantize_weight().T.to(torch.bfloat16).contiguous()
        n += 1
for k, v in hf.state_dict().items():
    if k in c.KEYS and k not in sd and "embed_tokens" not in k and not k.startswith("lm_head"):
        sd[k] = v.detach().to(torch.bfloat16).contiguous().clone()
assert n > 0, "GPTQModel left no quantized linear"
from safetensors.torch import save_file  # noqa: E402
save_file(sd, a.out)
c.report(t.seconds, linears=n)
