"""Tiny random-initialised models of every architecture in the table (no download), and a tiny tokenizer."""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB = 320  # > the 259 tokens of the byte-level tokenizer below
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=256)

# model_type -> config. Head counts: GQA (2 KV heads) where the family uses it, so that the optional
# v -> o group is both taken (MHA) and skipped (GQA) across the set.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, num_key_value_heads=4),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16,
                                                sliding_window=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_COMMON, num_key_value_heads=1, head_dim=16,
                                                         sliding_window=8),
    "phi3": lambda: transformers.Phi3Config(**_COMMON, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                                                eos_token_id=2),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=256,
                                          word_embed_proj_dim=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_COMMON),
    # MoE: 8 experts, top-2, expert width 32 (= the tests' group size)
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, num_key_value_heads=2, num_local_experts=8,
                                                  num_experts_per_tok=2, sliding_window=None),
    # layer 1 is dense (mlp_only_layers): both MLP kinds in one model; shared expert with a sigmoid gate
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**_COMMON, num_key_value_heads=2, num_experts=8,
                                                     num_experts_per_tok=2, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=64, mlp_only_layers=[1]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**_COMMON, num_key_value_heads=2, head_dim=16,
                                                     num_experts=8, num_experts_per_tok=2,
                                                     moe_intermediate_size=32),
    # MLA attention with q and kv low-rank paths; layer 0 dense (first_k_dense_replace); 8 experts in 2
    # groups, top-2 from the best group; one shared expert
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **_COMMON, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1),
}


def tiny_model(model_type: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CONFIGS[model_type]()
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()  # buffers keep their dtype
    return perturb_norms(m)


def perturb_norms(m):
    """Random init leaves norms at 1 (or 0 for 1+w norms): perturb them (every 1-d parameter, biases too)
    so that folding is really tested."""
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


TEXT = ("the quick brown fox jumps over the lazy dog and then it runs far away into the green hills "
        "where the sun sets slowly over the quiet river while birds sing their evening songs ") * 4


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# Vision-language models: tiny vision towers (one layer, 28x28 images of 2x2 patches of 14 pixels) and text
# models like the ones above. The last vocabulary ids are the image/video/vision-start tokens.
IMAGE = VOCAB - 1
_TXT = dict(_COMMON, num_key_value_heads=2)
_MROPE = {"type": "mrope", "mrope_section": [2, 2, 4]}
VLM_CONFIGS = {
    "llava": lambda: transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=28, patch_size=14),
        text_config=transformers.LlamaConfig(**_TXT), image_token_index=IMAGE),
    "qwen2_vl": lambda: transformers.Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        text_config=dict(**_TXT, rope_scaling=_MROPE, bos_token_id=1, eos_token_id=2),
        image_token_id=IMAGE, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3),
    "qwen2_5_vl": lambda: transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                           fullatt_block_indexes=[0]),
        text_config=dict(**_TXT, rope_scaling=_MROPE, bos_token_id=1, eos_token_id=2),
        image_token_id=IMAGE, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3),
    "gemma3": lambda: transformers.Gemma3Config(
        vision_config=transformers.SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14),
        text_config=transformers.Gemma3TextConfig(**dict(_TXT, num_key_value_heads=1), head_dim=16,
                                                  sliding_window=8),
        mm_tokens_per_image=4, image_token_index=IMAGE),
}


def tiny_vlm(model_type: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    cfg = VLM_CONFIGS[model_type]()
    m = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif not p.any():  # Gemma 3's projection matrix initialises to zeros: images would not matter
                p.normal_(0, 0.02)
    return m


def assert_reloads_to(out, fq: torch.nn.Module, other: torch.nn.Module, layers: str, dtype) -> None:
    """The quantized checkpoint in `out` reloads to exactly the fake-quantized weights of `fq` (every
    QuantLinear), and fq's first block's q_proj differs from `other`'s (another rounding on the same grid)."""
    from salience.arch import get_module
    from salience.checkpoint import load_quantized
    from salience.nn import QuantLinear
    qm, _ = load_quantized(out, dtype=dtype)
    mods = dict(fq.named_modules())
    n = 0
    for name, mod in qm.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.dequantized_weight(dtype), mods[name].weight), name
            n += 1
    assert n > 0
    w_other = get_module(other, layers)[0].self_attn.q_proj.weight
    assert not torch.equal(w_other, get_module(fq, layers)[0].self_attn.q_proj.weight)


def calib_file(tmp_path) -> str:
    """A small calibration text (40 short paragraphs) written under tmp_path; its path."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"paragraph {i}: the fox and the dog run in the hills. " * 3 for i in range(40)))
    return str(calib)
