"""Per-architecture structure as data: where the decoder blocks are, and the AWQ scaling groups.

A scaling group says: the output channels of `prev` (a norm, or some output rows of a linear) feed the
input channels of `linears`; scaling those inputs by s and the prev op's output by 1/s is exact in full
precision (AWQ, Lin et al. 2024, sec. 3.2). The scale is chosen to minimise the error of `inspect`'s
output (a module of the block; a single linear means the loss is the exact Gram form tr(dW G dW^T)).

A new family costs one entry in ARCHS, keyed by config.model_type. Names are relative to one block.

Mixture of experts. `*` in a name stands for every expert index of the block's experts ModuleList: a group
whose `prev` has no `*` shares one scale over all experts (norm -> every expert's gate/up, the shared
expert and the router); a group whose `prev` has `*` is repeated per expert (up_e -> down_e). Routers and
shared-expert gates read the scaled channels too, so they are in `compensate`: their weight columns are
multiplied by s (their logits stay exactly those of full precision, and so does routing) but they stay in
16 bits. transformers >= 5 stores experts fused as 3-D parameters; `Experts` says where, and
salience.moe unfuses them into per-expert linears before quantizing (the on-disk layout: one AWQ linear
per expert, as AutoAWQ and vLLM write and read).

Vision-language models (VLMS): the language model's blocks use the text model's entry; the vision tower
and the projector stay in 16 bits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # module whose output feeds `linears` (a norm or a linear)
    linears: tuple[str, ...]  # linears that read prev's output
    inspect: str  # module whose output error is the search loss
    # For a prev linear whose output is split (fused qkv, gate_up): (index, count) of the equal chunk of
    # its output rows that feeds `linears`. None = all rows.
    prev_chunk: tuple[int, int] | None = None
    # Optional groups are skipped when shapes disagree (e.g. v_proj -> o_proj under GQA, where one v
    # channel feeds several heads' o_proj columns); the report lists skipped groups.
    # Optional groups are also skipped when one of their modules is absent from the block (dense vs MoE
    # layers of one model).
    optional: bool = False
    # Modules reading prev's output that stay unquantized (routers, shared-expert gates): W[:, k] *= s[k],
    # so their outputs are unchanged in full precision. Not part of the search loss.
    compensate: tuple[str, ...] = ()


@dataclass(frozen=True)
class Experts:
    """Routed experts stored fused (transformers >= 5): gate_up_proj [E, 2I, H] = [gate; up] per expert,
    down_proj [E, H, I]. Unfused into `path`.<e>.{gate, up, down} linears."""
    path: str  # the experts module, relative to the block, e.g. "mlp.experts"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class Arch:
    layers: str  # attribute path of the ModuleList of decoder blocks, from the CausalLM model
    groups: tuple[ScaleGroup, ...]
    # Linears of a block that are quantized but are in no group's `linears` get only the clip search.
    # Norms computing x * (1 + w) (Gemma) fold 1/s as (1 + w) / s - 1.
    norm_plus_one: bool = False
    # Linears whose clip search is skipped (q/k: their error is shaped by softmax; reference behaviour).
    no_clip: tuple[str, ...] = ()
    # 16-bit dtype for the unquantized tensors of the checkpoint (Gemma overflows in fp16).
    dtype: str = "float16"
    notes: tuple[str, ...] = field(default=())
    experts: Experts | None = None
    # Modules of a block left in 16 bits (routers, shared-expert gates; linears among them are not
    # quantized); listed, with the model-level ones, in the checkpoint's modules_to_not_convert.
    not_convert: tuple[str, ...] = ()
    # Model-level modules left in 16 bits and outside the blocks (VLM vision tower, projector).
    not_convert_model: tuple[str, ...] = ()
    # (name in transformers' module tree, name in the checkpoint) substrings, where the family's published
    # checkpoints (and vLLM) use other names than transformers >= 5 (Mixtral: block_sparse_moe -> mlp).
    disk_names: tuple[tuple[str, str], ...] = ()


_LLAMA = Arch(
    layers="model.layers",
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", optional=True),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

# Gemma 2/3 add a norm after attention and one before and after the MLP: the MLP's input norm is
# pre_feedforward_layernorm (post_attention_layernorm normalises the attention output).
_GEMMA23 = Arch(
    layers="model.layers",
    groups=(
        _LLAMA.groups[0],
        _LLAMA.groups[1],
        ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        _LLAMA.groups[3],
    ),
    norm_plus_one=True,
    no_clip=_LLAMA.no_clip,
    dtype="bfloat16",
)

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,  # q/k/v biases: scaling input columns leaves a bias unchanged
    "qwen3": _LLAMA,  # q_norm/k_norm act per head after q/k_proj, untouched by input scaling
    "gemma": Arch(layers="model.layers", groups=_LLAMA.groups, norm_plus_one=True,
                  no_clip=_LLAMA.no_clip, dtype="bfloat16"),
    "gemma2": _GEMMA23,
    "gemma3_text": _GEMMA23,
    "phi3": Arch(
        layers="model.layers",
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            # v is the last third of qkv only without GQA (q, k, v of equal width)
            ScaleGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "self_attn.o_proj", prev_chunk=(2, 3),
                       optional=True),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            # gate_up's output is chunk(2): [gate | up]; only up feeds down linearly
            ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_chunk=(1, 2)),
        ),
        no_clip=("self_attn.qkv_proj",),
    ),
    "opt": Arch(
        layers="model.decoder.layers",
        groups=(
            ScaleGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                       "self_attn"),
            ScaleGroup("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj", optional=True),
            ScaleGroup("final_layer_norm", ("fc1",), "fc1"),
            ScaleGroup("fc1", ("fc2",), "fc2"),  # relu(x / s) = relu(x) / s for s > 0
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
        notes=("OPT-350m (do_layer_norm_before=False) puts the norms after the sublayers: not supported",),
    ),
    "gpt_neox": Arch(
        layers="gpt_neox.layers",
        groups=(
            ScaleGroup("input_layernorm", ("attention.query_key_value",), "attention"),
            ScaleGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),
            # No dense_h_to_4h -> dense_4h_to_h group: GELU(x / s) != GELU(x) / s, so the fold is not
            # exact. No qkv -> dense group: v rows are interleaved per head in query_key_value.
        ),
        no_clip=("attention.query_key_value",),
    ),
}

# ---- mixture of experts ------------------------------------------------------------------------------------

_ATTN = _LLAMA.groups[:2]


def _moe(prefix: str, gate: str, up: str, down: str, shared: str | None = None,
         shared_gate: str | None = None, router: str = "mlp.gate",
         norm: str = "post_attention_layernorm") -> tuple[ScaleGroup, ...]:
    """Scaling groups of a sparse MoE MLP (and, optional, of the dense MLP some layers use instead)."""
    e = f"{prefix}.*"
    first = (f"{e}.{gate}", f"{e}.{up}")
    if shared:
        first = (f"{shared}.gate_proj", f"{shared}.up_proj") + first
    groups = [
        # one scale for the router, every expert's gate/up and the shared expert: routing is unchanged
        ScaleGroup(norm, first, "mlp", optional=True,
                   compensate=(router,) + ((shared_gate,) if shared_gate else ())),
        ScaleGroup(f"{e}.{up}", (f"{e}.{down}",), f"{e}.{down}", optional=True),  # one group per expert
        # dense layers (Qwen2-MoE mlp_only_layers, DeepSeek first_k_dense_replace)
        ScaleGroup(norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp", optional=True),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", optional=True),
    ]
    if shared:
        groups.append(ScaleGroup(f"{shared}.up_proj", (f"{shared}.down_proj",), f"{shared}.down_proj",
                                 optional=True))
    return tuple(groups)


_QWEN_MOE = Arch(
    layers="model.layers",
    groups=_ATTN + _moe("mlp.experts", "gate_proj", "up_proj", "down_proj", shared="mlp.shared_expert",
                        shared_gate="mlp.shared_expert_gate"),
    no_clip=_LLAMA.no_clip,
    experts=Experts("mlp.experts"),
    not_convert=("mlp.gate", "mlp.shared_expert_gate"),
)

ARCHS.update({
    # Mixtral's published checkpoints name the MoE block block_sparse_moe (transformers >= 5: mlp) and the
    # experts w1 (gate), w3 (up), w2 (down); the checkpoint keeps those names, as vLLM reads them
    "mixtral": Arch(layers="model.layers", groups=_ATTN + _moe("mlp.experts", "w1", "w3", "w2"),
                    no_clip=_LLAMA.no_clip, experts=Experts("mlp.experts", "w1", "w3", "w2"),
                    not_convert=("mlp.gate",), disk_names=((".mlp.", ".block_sparse_moe."),)),
    "qwen2_moe": _QWEN_MOE,  # shared expert with a sigmoid gate: the gate is compensated, not quantized
    "qwen3_moe": Arch(layers="model.layers", groups=_ATTN + _moe("mlp.experts", "gate_proj", "up_proj",
                                                                 "down_proj"),
                      no_clip=_LLAMA.no_clip, experts=Experts("mlp.experts"), not_convert=("mlp.gate",)),
    # DeepSeek-V3 (MLA attention, sigmoid router with grouped top-k, one shared expert, the first
    # first_k_dense_replace layers dense). kv_a_proj_with_mqa's output is [latent | rope k]; only the latent
    # passes kv_a_layernorm. No v -> o group: v comes out of kv_b_proj interleaved with k per head.
    "deepseek_v3": Arch(
        layers="model.layers",
        groups=(
            ScaleGroup("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn",
                       optional=True),  # q_lora_rank set (the released models)
            ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn",
                       optional=True),  # q_lora_rank None (V2-Lite)
            # q_b and kv_b feed attention (softmax): the loss is attention's output, as for q/k/v
            ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), "self_attn", optional=True),
            ScaleGroup("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn"),
        ) + _moe("mlp.experts", "gate_proj", "up_proj", "down_proj", shared="mlp.shared_experts"),
        # q and the rope part of k are shaped by softmax: no clip search (reference behaviour for q/k)
        no_clip=("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_b_proj",
                 "self_attn.kv_a_proj_with_mqa"),
        experts=Experts("mlp.experts"),
        not_convert=("mlp.gate",),
    ),
})

# ---- vision-language models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VLM:
    """A vision-language model: its language model's blocks use the text model_type's entry."""
    layers: str  # the language model's blocks, from the top-level model
    not_convert: tuple[str, ...]  # vision tower and projector: 16 bits


VLMS: dict[str, VLM] = {
    "llava": VLM("model.language_model.layers", ("model.vision_tower", "model.multi_modal_projector")),
    "gemma3": VLM("model.language_model.layers", ("model.vision_tower", "model.multi_modal_projector")),
    "qwen2_vl": VLM("model.language_model.layers", ("model.visual",)),  # the merger is inside `visual`
    "qwen2_5_vl": VLM("model.language_model.layers", ("model.visual",)),
}
# Text models of VLMs whose model_type has no entry of its own: same block structure as the entry named.
TEXT_ALIASES = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2"}


class UnsupportedArchitecture(ValueError):
    pass


def arch_for(config) -> Arch:
    """The table entry for a transformers config; a clear error naming the supported families."""
    mt = getattr(config, "model_type", None)
    if mt in VLMS:
        vlm = VLMS[mt]
        text = arch_for(config.text_config)
        return replace(text, layers=vlm.layers, not_convert_model=vlm.not_convert)
    mt = TEXT_ALIASES.get(mt, mt)
    if mt not in ARCHS:
        raise UnsupportedArchitecture(
            f"architecture {mt!r} ({', '.join(getattr(config, 'architectures', None) or [])}) is not supported; "
            f"supported model_type values: {', '.join(sorted([*ARCHS, *VLMS]))}; `salience discover` "
            "finds the scaling groups of a new architecture"
        )
    if mt == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise UnsupportedArchitecture(ARCHS["opt"].notes[0])
    return ARCHS[mt]


def disk_name(arch: Arch, name: str, reverse: bool = False) -> str:
    """A tensor or module name in the checkpoint (reverse: in transformers' module tree)."""
    for a, b in arch.disk_names:
        name = name.replace(b, a) if reverse else name.replace(a, b)
    return name


def get_module(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


# ---- an entry as JSON (salience discover --json; salience_arch.json in a checkpoint) ----------------------

def arch_to_dict(arch: Arch) -> dict:
    return json.loads(json.dumps(asdict(arch)))  # tuples -> lists


def arch_from_dict(d: dict) -> Arch:
    groups = tuple(ScaleGroup(g["prev"], tuple(g["linears"]), g["inspect"],
                              tuple(g["prev_chunk"]) if g.get("prev_chunk") else None,
                              g.get("optional", False), tuple(g.get("compensate", ()))) for g in d["groups"])
    experts = Experts(**d["experts"]) if d.get("experts") else None
    return Arch(layers=d["layers"], groups=groups, norm_plus_one=d.get("norm_plus_one", False),
                no_clip=tuple(d.get("no_clip", ())), dtype=d.get("dtype", "float16"),
                notes=tuple(d.get("notes", ())), experts=experts, not_convert=tuple(d.get("not_convert", ())),
                not_convert_model=tuple(d.get("not_convert_model", ())),
                disk_names=tuple(tuple(p) for p in d.get("disk_names", ())))
