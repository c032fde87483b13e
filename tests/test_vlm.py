"""Vision-language models on tiny random configs: the language model's blocks are quantized with text-only
calibration, the vision tower and projector stay 16-bit, and the checkpoint loads back as the same class."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny import IMAGE, VLM_CONFIGS, calib_file, tiny_tokenizer, tiny_vlm

from salience import api
from salience.arch import VLMS, arch_for, get_module
from salience.checkpoint import INDEX, load_quantized
from salience.nn import QuantLinear
from salience.quant import QuantConfig
from salience.quantize import quantizable_linears


def test_every_vlm_entry_has_a_tiny_config():
    assert set(VLM_CONFIGS) == set(VLMS)


def _image_inputs(model, model_type):
    """Text with one tiny image, laid out as each family's processor would: LLaVA / Gemma 3 take a 28x28
    image as 4 placeholder tokens; Qwen2-VL / Qwen2.5-VL take flattened 2x2 patches (grid 1x2x2, merged
    2x2 into one token) after a vision-start token, with token types marking the image token."""
    torch.manual_seed(3)
    ids = torch.randint(3, 250, (1, 16))
    if model_type in ("llava", "gemma3"):
        ids[0, 2:6] = IMAGE
        return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28))
    v = model.config.vision_config
    ids[0, 2], ids[0, 3] = model.config.vision_start_token_id, IMAGE
    return dict(input_ids=ids, pixel_values=torch.randn(4, 3 * v.temporal_patch_size * v.patch_size ** 2),
                image_grid_thw=torch.tensor([[1, 2, 2]]), mm_token_type_ids=(ids == IMAGE).long())


@pytest.mark.parametrize("model_type", sorted(VLM_CONFIGS))
def test_vlm_quantize_and_reload(model_type, tmp_path):
    cfg0 = VLM_CONFIGS[model_type]()
    arch = arch_for(cfg0)
    dtype = getattr(torch, arch.dtype)
    m = tiny_vlm(model_type, dtype=dtype)
    cls = type(m)
    frozen = {k: v.clone() for k, v in m.state_dict().items()
              if any(k.startswith(p + ".") for p in arch.not_convert_model)}
    assert frozen
    calib = calib_file(tmp_path)
    out = tmp_path / "ckpt"
    _, fq, _ = api.quantize(None, out, QuantConfig(4, 32), "awq", calib, n_rows=8, seqlen=32,
                            device="cpu", dtype=dtype, loaded=(m, tiny_tokenizer()), progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["lm_head", *arch.not_convert_model]
    keys = json.loads((out / INDEX).read_text())["weight_map"]
    # vision tower and projector: 16-bit, bit-identical to the original; only language-model blocks packed
    tensors = {}
    for f in set(keys.values()):
        with safe_open(out / f, "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys() if k in frozen})
    assert set(tensors) == set(frozen)
    for k, v in frozen.items():
        assert torch.equal(tensors[k], v.to(dtype)), k
    assert all(k.startswith(arch.layers + ".") for k in keys if k.endswith(".qweight"))
    n_lin = sum(len(quantizable_linears(b, arch)) for b in get_module(fq, arch.layers))
    assert sum(k.endswith(".qweight") for k in keys) == n_lin > 0

    qm, _ = load_quantized(out, dtype=dtype)
    assert type(qm) is cls
    assert sum(isinstance(x, QuantLinear) for x in qm.modules()) == n_lin
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        a, b = fq(input_ids=ids).logits, qm(input_ids=ids).logits
        assert torch.isfinite(a).all()
        if dtype == torch.bfloat16:  # the CPU int4 kernel (bf16) sums in another order than F.linear
            torch.testing.assert_close(b, a, rtol=0.02, atol=0.01)
        else:
            assert torch.equal(a, b)
        # the 16-bit vision path still works after reload, and the image matters
        img = _image_inputs(qm, model_type)
        img["pixel_values"] = img["pixel_values"].to(dtype)
        a, b = fq(**img).logits, qm(**img).logits
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0.02, atol=0.01)
        other = qm(**dict(img, pixel_values=-img["pixel_values"])).logits
        assert not torch.allclose(other, b)
