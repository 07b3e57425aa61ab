"""Golden cases of the engine group (issue #18): exaone4, exaone_moe,
openelm, nemotron-nas, baichuan_m1.

baichuan_m1's sanitize L2-normalises lm_head's rows on every load, so a
saved model does not load back to itself. Its lm_head is therefore drawn
as a raw matrix whose normalisation (mlx-lm's own sanitize) is a fixed
point of a second normalisation (each row rescaled by 1.001 until it is);
the model holds that normalised head. Saved as it is (the fuzzer, an
mlx-lm conversion) it loads back bit for bit; the "baichuan_m1" layout
saves the raw matrix instead (as a Hugging Face checkpoint stores it), so
the engine's own normalisation is what the case checks.
"""
import dataclasses

import mlx.core as mx
import numpy as np

# Types whose layer is not llama's x + attn(norm(x)), h + mlp(norm(h)) with
# llama's module names meaning llama's things.
OWN_LAYOUT = {"exaone4", "openelm", "nemotron-nas", "baichuan_m1"}

TYPE_DEFAULTS = {
    # Per-layer head counts (4 query heads over 1 key/value head, then 2
    # over 2) and MLP widths: make_divisible(0.37 * 64 = 23.7, 16) rounds
    # down to 16, more than 10% below, so it becomes 32; 1.3 * 64 -> 80.
    "openelm": {"head_dim": 16, "num_transformer_layers": 2, "model_dim": 64,
                "ffn_dim_divisor": 16, "num_query_heads": [4, 2], "num_kv_heads": [1, 2],
                "ffn_multipliers": [0.37, 1.3]},
    "exaone4": {"head_dim": 16, "tie_word_embeddings": True, "rope_scaling": None,
                "sliding_window": 4, "sliding_window_pattern": "LG"},
    "exaone_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                   "num_shared_experts": 1, "moe_intermediate_size": 32, "intermediate_size": 64,
                   "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
                   "is_moe_layer": [False, True], "n_group": 2, "topk_group": 1,
                   "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                   "tie_word_embeddings": True},
    # Layer 0 slides (window 4) with 2 heads over 1 key/value head (head
    # size 32); layer 1 is global with 4 over 2 (head size 16).
    "baichuan_m1": {"sliding_window": 4, "sliding_window_layers": [0], "conv_window": 2,
                    "num_swa_attention_heads": 2, "num_swa_key_value_heads": 1},
    "nemotron-nas": {"hidden_act": "silu", "block_configs": [
        {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0}}]},
}

TYPE_UNUSED_BASE_KEYS = {
    "openelm": ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rope_theta", "max_position_embeddings",
                "tie_word_embeddings"],
    # head_dim = hidden_size / heads; key/value heads and the MLP width per layer.
    "nemotron-nas": ["num_key_value_heads", "intermediate_size"],
}

CASES = [
    # 3 layers, pattern 'LG': layers 0 and 2 local (window 4, RoPE), layer 1
    # global without RoPE; tied head.
    {"name": "exaone4", "model_type": "exaone4", "config": {"num_hidden_layers": 3,
                                                           "intermediate_size": 32}},
    # Layer 0 sliding (window 4, RoPE) with a dense MLP, layer 1 full (no
    # RoPE) with a MoE: 4 experts in 2 groups (1 kept), top 2, sigmoid
    # scores with correction bias, renormalised and scaled by 2.5, plus a
    # shared expert.
    {"name": "exaone_moe", "model_type": "exaone_moe", "config": {}},
    {"name": "openelm", "model_type": "openelm", "config": {}, "seed": 2},
    # Four kinds of layers: full attention (2 heads per key/value head) and
    # a full MLP (width 256); a linear map for attention and no MLP; no
    # attention and a linear map for the MLP; full attention (MHA) and no
    # MLP. Biases on; hidden_act gelu_fast, which mlx-lm runs as gelu_approx.
    # Hidden 48 (4 heads of 12): the full MLP is 256 wide whatever ffn_mult.
    {"name": "nemotron-nas", "model_type": "nemotron-nas", "config": {
        "num_hidden_layers": 4, "hidden_size": 48, "attention_bias": True, "mlp_bias": True,
        "hidden_act": "gelu_fast", "tie_word_embeddings": True,
        "block_configs": [
            {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.0}},
            {"attention": {"replace_with_linear": True}, "ffn": {"no_op": True}},
            {"attention": {"no_op": True}, "ffn": {"replace_with_linear": True}},
            {"attention": {"n_heads_in_group": 1}, "ffn": {"no_op": True}},
        ]}, "seed": 1},
    # The raw (unnormalised) head, normalised by the engine on load.
    {"name": "baichuan_m1", "model_type": "baichuan_m1", "config": {"intermediate_size": 64},
     "hf_layout": "baichuan_m1"},
]

# Normalised baichuan_m1 heads (their bytes) -> the raw matrix they came from.
_RAW_HEADS = {}


def _normalised(model, raw):
    return model.sanitize({"lm_head.weight": raw})["lm_head.weight"]


def _patch_randomize(mg):
    orig = mg.randomize_parameters

    def randomize_parameters(model, seed):
        orig(model, seed)
        if not type(model).__module__.endswith(".baichuan_m1") or "lm_head" not in model:
            return
        raw = model.lm_head.weight
        for _ in range(200):
            head = _normalised(model, raw)
            again = _normalised(model, head)
            mx.eval(head, again)
            moved = np.any(np.array(head) != np.array(again), axis=-1)
            if not moved.any():
                break
            raw = raw * mx.array(np.where(moved, 1.001, 1.0)[:, None].astype(np.float32))
        else:
            raise RuntimeError("baichuan_m1: no lm_head whose normalisation is a fixed point")
        _RAW_HEADS[np.array(head).tobytes()] = raw
        model.lm_head.weight = head
        mx.eval(model.parameters())

    mg.randomize_parameters = randomize_parameters


def _baichuan_raw_head(weights, config):
    """mlx-lm's names, with lm_head.weight as drawn (before normalisation)."""
    out = dict(weights)
    head = out.get("lm_head.weight")
    if head is not None and mx.issubdtype(head.dtype, mx.floating):
        out["lm_head.weight"] = _RAW_HEADS[np.array(head).tobytes()]
    return out


def _openelm(model_type, config):
    return model_type == "openelm"


def _index(mg, module, name):
    return next(k for k, r in enumerate(mg.TAPS) if r.module == module and r.name == name)


def _insert_after(mg, module, name, rows):
    """Insert TAPS rows right after the row (module, name)."""
    k = _index(mg, module, name) + 1
    mg.TAPS[k:k] = rows


def _patch_moe_reference(mg):
    """exaone_moe routes as deepseek_v3 (sigmoid scores, correction bias,
    groups scored by their two best experts, renormalised, scaled; shared
    experts under shared_experts)."""
    orig = mg.moe_reference

    def moe_reference(block, model_type, config, x):
        return orig(block, "deepseek_v3" if model_type == "exaone_moe" else model_type, config, x)

    mg.moe_reference = moe_reference


def register(mg):
    Tap = mg.Tap
    mg.TYPE_DEFAULTS.update(TYPE_DEFAULTS)
    mg.TYPE_UNUSED_BASE_KEYS.update(TYPE_UNUSED_BASE_KEYS)
    mg.CASES += CASES
    # No pattern: every layer global, with RoPE, no window.
    mg.CASES.append(mg._derived("exaone4", "exaone4_global", {
        "num_hidden_layers": 2, "sliding_window_pattern": None, "sliding_window": None}))
    mg.POST_NORM_TYPES = mg.POST_NORM_TYPES | {"exaone4"}
    mg.NON_LINEAR_ROUTER_TYPES = mg.NON_LINEAR_ROUTER_TYPES | {"exaone_moe"}
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | OWN_LAYOUT
    _patch_moe_reference(mg)
    _patch_randomize(mg)
    mg.HF_LAYOUTS["baichuan_m1"] = (_baichuan_raw_head, {"format": "mlx"})
    # baichuan_m1's 2-tap convolutions of k and v: ~1/sqrt(2), as nn.Conv1d's.
    mg.SPECIAL_INITS["conv_k"] = mg.SPECIAL_INITS["conv_v"] = lambda noise: mg.CONV_STD * noise
    # block_configs must have num_hidden_layers entries, each dividing the heads.
    mg.FUZZ_FIXED_DIMS.add("nemotron-nas")
    # baichuan_m1: the fused W_pack = [q | k | v] (its conv is no module).
    _insert_after(mg, "model.layers.{i}.attention.wqkv", "layers.{i}.attn.qkv", [
        Tap("model.layers.{i}.self_attn.W_pack", "layers.{i}.attn.qkv", detail=True)])
    # nemotron-nas: an attention or MLP replaced by one linear map.
    _insert_after(mg, "model.layers.{i}.self_attn.o_proj", "layers.{i}.attn", [
        Tap("model.layers.{i}.self_attn.linear", "layers.{i}.attn_linear")])
    _insert_after(mg, "model.layers.{i}.mlp.down_proj", "layers.{i}.mlp.down", [
        Tap("model.layers.{i}.mlp.linear", "layers.{i}.mlp_linear")])
    # openelm (transformer.*): fused qkv_proj, q/k norms on [B, H, T, D],
    # fused proj_1 = [gate | up]. Only for openelm: lille-130m (dense_a)
    # has transformer.layers.{i} and transformer.norm too.
    rows = [
        Tap("transformer.token_embeddings", "embed"),
        Tap("transformer.layers.{i}.attn_norm", "layers.{i}.attn_norm"),
        Tap("transformer.layers.{i}.attn.qkv_proj", "layers.{i}.attn.qkv", detail=True),
        Tap("transformer.layers.{i}.attn.q_norm", "layers.{i}.attn.q_norm", detail=True),
        Tap("transformer.layers.{i}.attn.k_norm", "layers.{i}.attn.k_norm", detail=True),
        Tap("transformer.layers.{i}.attn.rope", "layers.{i}.attn.q_rope", call=0, detail=True),
        Tap("transformer.layers.{i}.attn.rope", "layers.{i}.attn.k_rope", call=1, detail=True),
        Tap("transformer.layers.{i}.attn.out_proj", "layers.{i}.attn.o"),
        Tap("transformer.layers.{i}.attn.out_proj", "layers.{i}.attn"),
        Tap("transformer.layers.{i}", "layers.{i}.h", residual="attn"),
        Tap("transformer.layers.{i}.ffn_norm", "layers.{i}.mlp_norm"),
        Tap("transformer.layers.{i}.ffn.proj_1", "layers.{i}.mlp.gate_up"),
        Tap("transformer.layers.{i}.ffn.proj_2", "layers.{i}.mlp.down"),
        Tap("transformer.layers.{i}.ffn", "layers.{i}.mlp"),
        Tap("transformer.layers.{i}", "layers.{i}"),
        Tap("transformer.norm", "norm"),
    ]
    at = _index(mg, "", "logits")
    mg.TAPS[at:at] = [dataclasses.replace(row, applies=_openelm) for row in rows]
