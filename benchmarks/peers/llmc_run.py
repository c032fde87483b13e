"""llm-compressor AWQModifier or GPTQModifier (INT asymmetric, group-wise, lm_head kept), given exactly the
orchestrator's calibration rows. The weights it leaves in the model are full precision (AWQ-rescaled);
the quantized value is fake_quantize(weight, weight_scale, weight_zero_point), which is what its
checkpoint would hold."""
import _common as c
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from datasets import Dataset

a = c.args({"--method": {"choices": ["awq", "gptq"], "required": True}})
m, tok = c.load(a.model)
rows = c.rows(a.rows)
ds = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist()})
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=a.bits, type="int", symmetric=False, strategy="group", group_size=a.group_size))
quant = dict(config_groups={"group_0": scheme}, ignore=["lm_head"])
if a.method == "awq":
    # llm-compressor pins cached activations unconditionally, which fails without an accelerator;
    # pinning only speeds host-to-device copies, so a no-op is harmless here.
    from llmcompressor.pipelines.cache import IntermediatesCache
    IntermediatesCache.pin_memory = lambda self, *args, **kw: None
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    recipe = [AWQModifier(), QuantizationModifier(**quant)]
else:
    from llmcompressor.modifiers.gptq import GPTQModifier
    recipe = [GPTQModifier(**quant)]
from llmcompressor import oneshot

with c.Timer() as t:
    oneshot(model=m, dataset=ds, recipe=recipe, max_seq_length=rows.shape[1], num_calibration_samples=len(rows),
            shuffle_calibration_samples=False)
n = 0
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear) and hasattr(mod, "weight_scale"):
            mod.weight.data = fake_quantize(mod.weight.data, mod.weight_scale, mod.weight_zero_point,
                                            mod.quantization_scheme.weights).to(mod.weight.dtype)
            n += 1
assert n > 0, "llm-compressor left no quantized linear"
c.save(m, a.out)
c.report(t.seconds, linears=n)
