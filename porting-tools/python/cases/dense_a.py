"""Dense llama-like families (issue #18, group dense_a): telechat3,
iquestcoder / xverse (mlx-lm aliases of llama), seed_oss, helium, internlm3,
exaone, lille-130m, qwen (Qwen-1), glm, mimo."""
import dataclasses

import mlx.core as mx

# GPT-style module names (transformer.wte, transformer.h.{i}.ln_1, ...).
GPT_NAMED = frozenset({"exaone", "qwen"})


def _gpt_named(model_type, config):
    return model_type in GPT_NAMED


def _lille(model_type, config):
    return model_type == "lille-130m"


def _with_extra(extra):
    """A saved layout: mlx-lm's own names plus tensors its sanitize drops
    (rotary inv_freq buffers, MTP layers), so a case exercises the drops."""

    def convert(weights, config):
        out = dict(weights)
        for name, shape in extra(config).items():
            out[name] = mx.zeros(shape, dtype=mx.float32) + 0.5
        return dict(sorted(out.items()))

    return convert


def _unless_duplicated(mg, row):
    """`row` that steps aside, at binding time (when every case module has
    added its rows), for an identical row of another module that applies."""
    mine = row.applies
    key = (row.module, row.name, row.residual, row.call)

    def applies(model_type, config):
        if mine is not None and not mine(model_type, config):
            return False
        return not any(
            other is not replaced and (other.module, other.name, other.residual, other.call) == key
            and (other.applies is None or other.applies(model_type, config))
            for other in mg.TAPS)

    replaced = dataclasses.replace(row, applies=applies)
    return replaced


def register(mg):
    Tap = mg.Tap

    mg.TYPE_UNUSED_BASE_KEYS.update({
        # num_layers / layer_norm_epsilon instead.
        "exaone": ["num_hidden_layers", "rms_norm_eps"],
        # n_embd, n_head, n_kv_heads, n_layer, layer_norm_eps, block_size; always tied.
        "lille-130m": ["hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "intermediate_size", "rms_norm_eps",
                       "max_position_embeddings", "tie_word_embeddings"],
        # MHA only, layer_norm_epsilon, plain RoPE base 1e4, never tied.
        "qwen": ["num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings"],
    })
    mg.TYPE_DEFAULTS.update({
        "telechat3": {},
        "iquestcoder": {"rope_traditional": False},
        "xverse": {"rope_traditional": False},
        "seed_oss": {"head_dim": 16},
        "helium": {"attention_bias": False, "mlp_bias": False, "head_dim": 16},
        "internlm3": {},
        "exaone": {"num_layers": 2, "layer_norm_epsilon": 1e-5},
        "lille-130m": {"n_embd": 64, "n_head": 4, "n_kv_heads": 2, "n_layer": 2,
                       "block_size": 512, "layer_norm_eps": 1e-5},
        "qwen": {"kv_channels": 16, "layer_norm_epsilon": 1e-5, "no_bias": True},
        "glm": {"head_dim": 16},
        "mimo": {},
    })
    mg.HF_LAYOUTS.update({
        # rotary inv_freq buffers (dropped by the specs as by sanitize).
        "glm_inv_freq": (_with_extra(lambda c: {
            f"model.layers.{i}.self_attn.rotary_emb.inv_freq": (c["head_dim"] // 2,)
            for i in range(c["num_hidden_layers"])}), {"format": "mlx"}),
        "lille_rotary": (_with_extra(lambda c: {
            f"transformer.layers.{i}.attention.rotary_emb.inv_freq": (c["n_embd"] // c["n_head"] // 2,)
            for i in range(c["n_layer"])}), {"format": "mlx"}),
        # MiMo's multi-token-prediction layer (sanitize drops model.mtp_layers.*).
        "mimo_mtp": (_with_extra(lambda c: {
            "model.mtp_layers.0.input_layernorm.weight": (c["hidden_size"],),
            "model.mtp_layers.0.eh_proj.weight": (c["hidden_size"], 2 * c["hidden_size"]),
            "model.layers.0.self_attn.rotary_emb.inv_freq": (8,)}), {"format": "mlx"}),
        "internlm3_inv_freq": (_with_extra(lambda c: {
            f"model.layers.{i}.attention.rope.inv_freq": (8,)
            for i in range(c["num_hidden_layers"])}), {"format": "mlx"}),
    })

    mg.CASES += [
        # telechat3-yarn scaling (yarn frequencies and mscale at every
        # position), explicit head_dim 32 (attention 128 wide), attention_bias
        # on q/k/v and o, MLP biases, untied head (the type's default).
        {"name": "telechat3", "model_type": "telechat3", "seed": 0,
         "config": {"head_dim": 32, "intermediate_size": 64, "attention_bias": True,
                    "mlp_bias": True, "rope_scaling": {"rope_type": "telechat3-yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 64,
                                     "beta_fast": 32, "beta_slow": 1}}},
        # mlx-lm aliases of llama (MODEL_REMAPPING).
        {"name": "iquestcoder", "model_type": "iquestcoder", "seed": 0, "config": {"rope_theta": 500000.0}},
        {"name": "xverse", "model_type": "xverse", "seed": 0, "config": {"tie_word_embeddings": True}},
        # q/k/v biases without an o bias (attention_out_bias false), head_dim
        # 32, tied head (the type's default).
        {"name": "seed_oss", "model_type": "seed_oss", "seed": 0,
         "config": {"head_dim": 32, "attention_bias": True, "attention_out_bias": False,
                    "tie_word_embeddings": True}},
        # Interleaved RoPE; head_dim 8 in the config is ignored (hidden /
        # heads = 16); q/k/v and MLP biases, no o bias; tied, with the
        # lm_head.weight mlx-lm's helium always has (unused) in the file.
        {"name": "helium", "model_type": "helium", "seed": 0,
         "config": {"head_dim": 8, "attention_bias": True, "mlp_bias": True,
                    "tie_word_embeddings": True}},
        # qkv_bias on q/k/v and o, bias on the MLP; linear rope scaling (the
        # other kind it takes, dynamic NTK, changes nothing before
        # max_position_embeddings, where lmspec stops generating); rope
        # inv_freq buffers in the file.
        {"name": "internlm3", "model_type": "internlm3", "seed": 0,
         "config": {"qkv_bias": True, "bias": True,
                    "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
         "hf_layout": "internlm3_inv_freq"},
        # GPT-style names; attention and MLP biases; tied head (the default).
        {"name": "exaone", "model_type": "exaone", "seed": 0,
         "config": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True,
                    "rope_theta": 1000000.0}},
        # Norms inside attention / feed_forward, fused qkv_proj, interleaved
        # RoPE, MLP 256 wide (round(170 / 256) = 1), tied; rotary buffers.
        # One KV head and vocab 128 to stay near the size budget.
        {"name": "lille-130m", "model_type": "lille-130m", "seed": 0,
         "config": {"n_kv_heads": 1, "vocab_size": 128},
         "hf_layout": "lille_rotary"},
        # Fused biased c_attn, c_proj / MLP / lm_head biases (no_bias false),
        # MLP 128 // 2 wide with w2 gating.
        {"name": "qwen", "model_type": "qwen", "seed": 0, "config": {"no_bias": False}},
        # Fused gate_up_proj, interleaved RoPE, head_dim 32, q/k/v biases
        # (no o bias), tied; rotary inv_freq buffers in the file.
        {"name": "glm", "model_type": "glm", "seed": 1,
         "config": {"head_dim": 32, "attention_bias": True, "tie_word_embeddings": True},
         "hf_layout": "glm_inv_freq"},
        # q/k/v biases, untied; an MTP layer and a rotary buffer in the file.
        {"name": "mimo", "model_type": "mimo", "seed": 2, "config": {"num_nextn_predict_layers": 1},
         "hf_layout": "mimo_mtp"},
    ]
    # 4-bit with one module at 8 bits under mlx-lm's name: the spec renames
    # that module, and the override follows the rename.
    mg.CASES.append(mg._derived("exaone", "exaone_q4", quantize={
        "bits": 4, "group_size": 32,
        "overrides": {"transformer.h.1.attn.attention.q_proj": {"group_size": 32, "bits": 8}}}))

    rows = [
        # exaone / qwen (transformer.h.{i}).
        Tap("transformer.wte", "embed", applies=_gpt_named),
        Tap("transformer.h.{i}.ln_1", "layers.{i}.attn_norm", applies=_gpt_named),
        Tap("transformer.h.{i}.attn.attention.q_proj", "layers.{i}.attn.q", detail=True),
        Tap("transformer.h.{i}.attn.attention.k_proj", "layers.{i}.attn.k", detail=True),
        Tap("transformer.h.{i}.attn.attention.v_proj", "layers.{i}.attn.v", detail=True),
        Tap("transformer.h.{i}.attn.attention.rope", "layers.{i}.attn.q_rope", call=0, detail=True),
        Tap("transformer.h.{i}.attn.attention.rope", "layers.{i}.attn.k_rope", call=1, detail=True),
        Tap("transformer.h.{i}.attn.attention.out_proj", "layers.{i}.attn.o"),
        # exaone's attn is a holder; its attention module does the work.
        Tap("transformer.h.{i}.attn.attention", "layers.{i}.attn", applies=_gpt_named),
        Tap("transformer.h.{i}", "layers.{i}.h", residual="attn.attention", applies=_gpt_named),
        Tap("transformer.h.{i}.attn.c_attn", "layers.{i}.attn.qkv", detail=True,
            applies=_gpt_named),
        Tap("transformer.h.{i}.attn.rotary_emb", "layers.{i}.attn.q_rope", call=0, detail=True),
        Tap("transformer.h.{i}.attn.rotary_emb", "layers.{i}.attn.k_rope", call=1, detail=True),
        Tap("transformer.h.{i}.attn.c_proj", "layers.{i}.attn.o", applies=_gpt_named),
        Tap("transformer.h.{i}.attn", "layers.{i}.attn", applies=lambda t, c: t == "qwen"),
        Tap("transformer.h.{i}", "layers.{i}.h", residual="attn",
            applies=lambda t, c: t == "qwen"),
        Tap("transformer.h.{i}.ln_2", "layers.{i}.mlp_norm", applies=_gpt_named),
        Tap("transformer.h.{i}.mlp.c_fc_0", "layers.{i}.mlp.gate"),  # exaone
        Tap("transformer.h.{i}.mlp.c_fc_1", "layers.{i}.mlp.up"),
        Tap("transformer.h.{i}.mlp.w2", "layers.{i}.mlp.gate", applies=_gpt_named),  # qwen
        Tap("transformer.h.{i}.mlp.w1", "layers.{i}.mlp.up", applies=_gpt_named),
        Tap("transformer.h.{i}.mlp.c_proj", "layers.{i}.mlp.down", applies=_gpt_named),
        Tap("transformer.h.{i}.mlp", "layers.{i}.mlp", applies=_gpt_named),
        Tap("transformer.h.{i}", "layers.{i}", applies=_gpt_named),
        Tap("transformer.ln_f", "norm", applies=_gpt_named),
        # lille-130m: each branch's norm inside it.
        Tap("transformer.tok_embeddings", "embed", applies=_lille),
        Tap("transformer.layers.{i}.attention.norm", "layers.{i}.attn_norm", applies=_lille),
        Tap("transformer.layers.{i}.attention.qkv_proj", "layers.{i}.attn.qkv", detail=True,
            applies=_lille),
        Tap("transformer.layers.{i}.attention.rope", "layers.{i}.attn.q_rope", call=0,
            detail=True, applies=_lille),
        Tap("transformer.layers.{i}.attention.rope", "layers.{i}.attn.k_rope", call=1,
            detail=True, applies=_lille),
        Tap("transformer.layers.{i}.attention.out_proj", "layers.{i}.attn.o", applies=_lille),
        Tap("transformer.layers.{i}.attention", "layers.{i}.attn", applies=_lille),
        Tap("transformer.layers.{i}", "layers.{i}.h", residual="attention", applies=_lille),
        Tap("transformer.layers.{i}.feed_forward.norm", "layers.{i}.mlp_norm", applies=_lille),
        Tap("transformer.layers.{i}.feed_forward.gate_proj", "layers.{i}.mlp.gate",
            applies=_lille),
        Tap("transformer.layers.{i}.feed_forward.up_proj", "layers.{i}.mlp.up", applies=_lille),
        Tap("transformer.layers.{i}.feed_forward.down_proj", "layers.{i}.mlp.down",
            applies=_lille),
        Tap("transformer.layers.{i}.feed_forward", "layers.{i}.mlp", applies=_lille),
        Tap("transformer.layers.{i}", "layers.{i}", applies=_lille),
        Tap("transformer.norm", "norm", applies=_lille),
    ]
    # Other case modules may add the same rows (gpt_bigcode's transformer.*
    # layout): a row of ours steps aside for an identical row of theirs that
    # applies too, so that the name is given once.
    rows = [_unless_duplicated(mg, row) for row in rows]
    # Before the final logits row.
    last = next(k for k, row in enumerate(mg.TAPS) if row.module == "" and row.name == "logits")
    mg.TAPS[last:last] = rows

    # telechat3 / glm name their head counts num_attention_heads, helium
    # keeps an unused lm_head when tied: the generic tap checks instead of
    # llama's.
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | {"telechat3", "glm", "helium"}

    # qwen's kv_channels must equal hidden_size / heads (c_proj maps
    # heads * kv_channels to hidden_size and back).
    mg.FUZZ_FIXED_DIMS.add("qwen")
