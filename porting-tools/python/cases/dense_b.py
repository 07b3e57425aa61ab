"""Golden cases of the dense_b group: glm4, gpt_bigcode, gptj,
hunyuan_v1_dense, olmo3, cohere2, plamo3, spark2_5."""
import dataclasses

import mlx.core as mx

# Types whose layer is not llama's x + attn(norm(x)), h + mlp(norm(h)) with
# llama's module names meaning llama's things.
OWN_LAYOUT = {"olmo3", "cohere2", "glm4", "gptj", "gpt_bigcode", "hunyuan_v1_dense",
              "plamo3", "spark2_5"}

TYPE_DEFAULTS = {
    "plamo3": {"head_dim": 16, "sliding_window_pattern": 2, "rope_local_theta": 10000.0,
               "rope_theta": 1000000.0, "tie_word_embeddings": True},
    "spark2_5": {"head_dim": 16, "sliding_window": 4, "tie_word_embeddings": True,
                 "rope_parameters": {"sliding_attention": {"rope_theta": 10000.0},
                                     "full_attention": {"rope_theta": 1000000.0}}},
    "hunyuan_v1_dense": {"use_qk_norm": True},
    "gpt_bigcode": {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_inner": 128, "n_positions": 48,
                    "layer_norm_epsilon": 1e-5, "vocab_size": 256},
    "gptj": {"n_embd": 48, "n_head": 4, "n_layer": 2, "n_positions": 48,
             "layer_norm_epsilon": 1e-5, "vocab_size": 256, "rotary_dim": 8},
    "glm4": {"head_dim": 16, "attention_bias": True, "partial_rotary_factor": 0.5},
    "olmo3": {"sliding_window": 4},
    "cohere2": {"layer_norm_eps": 1e-5, "layer_norm_bias": False, "head_dim": 16,
                "sliding_window": 4, "sliding_window_pattern": 2},
}

TYPE_UNUSED_BASE_KEYS = {
    "spark2_5": ["rope_theta"],
    "gptj": [],  # set in register: every BASE_CONFIG key
    "glm4": ["tie_word_embeddings"],
    "cohere2": ["rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"],
}

CASES = [
    # Default layer pattern (every 4th layer full): layers 0-2 slide over 4
    # positions, layer 3 is full and alone gets the linear rope scaling;
    # q/k/v/o biases.
    {"name": "olmo3", "model_type": "olmo3",
     "config": {"num_hidden_layers": 4, "intermediate_size": 32, "attention_bias": True,
                "tie_word_embeddings": True,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "seed": 1},
    # Four norms per layer, q/k/v biases, interleaved rope on half of each head.
    {"name": "glm4", "model_type": "glm4", "config": {}},
    # Parallel attention and MLP on one LayerNorm; interleaved rope on 8 of
    # the 12 features of each head (hidden 48: a 4x MLP of 64 would not fit).
    {"name": "gptj", "model_type": "gptj", "config": {}},
    # Multi-query attention (one key/value head) in the fused c_attn, biases,
    # tied head; then the same with 4 key/value heads and an untied head.
    {"name": "gpt_bigcode", "model_type": "gpt_bigcode", "config": {}},
    {"name": "gpt_bigcode_mha", "model_type": "gpt_bigcode",
     "config": {"multi_query": False, "tie_word_embeddings": False}},
    # q/k RMS norms after the rope, whose base alpha raises to
    # 10000 * 1000 ** (16 / 14); q/k/v/o biases.
    {"name": "hunyuan_v1_dense", "model_type": "hunyuan_v1_dense",
     "config": {"attention_bias": True,
                "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}}},
    # Default layer pattern: layers 0-2 slide over 4 positions with rope on
    # half of each head, layer 3 is full with its own theta; sigmoid output
    # gate per head; biases on every projection.
    {"name": "spark2_5", "model_type": "spark2_5",
     "config": {"num_hidden_layers": 4, "intermediate_size": 32, "attention_bias": True,
                "mlp_bias": True,
                "rope_parameters": {
                    "sliding_attention": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                    "full_attention": {"rope_theta": 1000000.0}}}, "seed": 3},
    # Layer 0 sliding (local rope base), layer 1 full. The window is the
    # prompt's length, 12: mlx-lm masks a multi-token chunk with window + 1
    # keys but caches (and decodes over) window keys, which agree only while
    # no prefill chunk reaches past the window; here the window bites in
    # every greedy decode step (positions 12..43).
    {"name": "plamo3", "model_type": "plamo3", "config": {"sliding_window": 12}},
    # Hugging Face's layouts, which mlx-lm's sanitize turns back: gptj under
    # transformer.* with the attention mask buffers; spark2_5 with the
    # embedding as embed_tokens, rotary inv_freq buffers and a tied lm_head.
    {"name": "gptj_hf", "model_type": "gptj", "config": {}, "hf_layout": "gptj"},
    {"name": "spark2_5_hf", "model_type": "spark2_5", "config": {}, "hf_layout": "spark2_5"},
    # Layer 0 local (window 4, interleaved rope), layer 1 global (no rope).
    {"name": "cohere2", "model_type": "cohere2", "config": {"logit_scale": 0.5}},
]


def register(mg):
    register_olmo(mg)
    register_bitnet(mg)
    # mlx-lm's olmo3 needs a full and a sliding layer: its 4 layers (every
    # 4th full) stay as in the base case.
    mg.FUZZ_FIXED_DIMS.add("olmo3")
    mg.TYPE_DEFAULTS.update(TYPE_DEFAULTS)
    mg.TYPE_UNUSED_BASE_KEYS.update(TYPE_UNUSED_BASE_KEYS)
    mg.TYPE_UNUSED_BASE_KEYS["gptj"] = list(mg.BASE_CONFIG)
    mg.TYPE_UNUSED_BASE_KEYS["gpt_bigcode"] = list(mg.BASE_CONFIG)
    mg.CASES += CASES
    # A window (3) shorter than the prompt: plamo3's sliding layer sees 4
    # keys in a multi-token call, 3 in a decode step (attention chunk_window).
    mg.CASES.append(mg._derived("plamo3", "plamo3_short_window", {"sliding_window": 3}, seed=0))
    mg.HF_LAYOUTS["gptj"] = (gptj_to_hf, {"format": "pt"})
    mg.HF_LAYOUTS["spark2_5"] = (spark2_5_to_hf, {"format": "pt"})
    mg.POST_NORM_TYPES = mg.POST_NORM_TYPES | {"olmo3"}
    mg.FULL_WIDTH_QK_NORM_TYPES = mg.FULL_WIDTH_QK_NORM_TYPES | {"olmo3"}
    mg.PARALLEL_TYPES = mg.PARALLEL_TYPES | {"cohere2", "gptj"}
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | OWN_LAYOUT
    # Rows that do not hold (or cannot be bound) for some of these types.
    skip = {
        # cohere2's global layers never call their rope.
        ("model.layers.{i}.self_attn.rope", "layers.{i}.attn.q_rope", None): {"cohere2"},
        ("model.layers.{i}.self_attn.rope", "layers.{i}.attn.k_rope", None): {"cohere2"},
        # Not x + self_attn(...) / x + attn(...).
        ("model.h.{i}", "layers.{i}.h", "attn"): {"gptj"},
        ("model.layers.{i}", "layers.{i}.h", "self_attn"): {"glm4"},
    }
    # The residual h after the attention: x + post-attention norm.
    mg.TAPS[_after(mg, "model.layers.{i}.self_attn.out_proj", "layers.{i}.attn"):0] = [
        mg.Tap("model.layers.{i}.post_self_attn_layernorm", "layers.{i}.post_attn_norm"),  # glm4
        mg.Tap("model.layers.{i}", "layers.{i}.h", residual="post_self_attn_layernorm"),
    ]
    mg.TAPS[_after(mg, "model.layers.{i}.post_feedforward_layernorm", "layers.{i}.post_mlp_norm"):0] = [
        mg.Tap("model.layers.{i}.post_mlp_layernorm", "layers.{i}.post_mlp_norm"),  # glm4
    ]
    # gptj (model.h.{i}.attn.{q,k,v,out}_proj, mlp.fc_in / fc_out). Its rope
    # runs on the rotated slice only (keys first): no rope taps.
    mg.TAPS[_after(mg, "model.h.{i}.input_layernorm", "layers.{i}.attn_norm"):0] = [
        mg.Tap("model.h.{i}.attn.q_proj", "layers.{i}.attn.q", detail=True),
        mg.Tap("model.h.{i}.attn.k_proj", "layers.{i}.attn.k", detail=True),
        mg.Tap("model.h.{i}.attn.v_proj", "layers.{i}.attn.v", detail=True),
        mg.Tap("model.h.{i}.attn.out_proj", "layers.{i}.attn.o"),
    ]
    mg.TAPS[_after(mg, "model.h.{i}.mlp.dense_h_to_4h", "layers.{i}.mlp.up"):0] = [
        mg.Tap("model.h.{i}.mlp.fc_in", "layers.{i}.mlp.up"),
        mg.Tap("model.h.{i}.mlp.fc_out", "layers.{i}.mlp.down"),
    ]
    # hunyuan_v1_dense: q/k norms after the rope.
    mg.TAPS[_after(mg, "model.layers.{i}.self_attn.rope", "layers.{i}.attn.k_rope"):0] = [
        mg.Tap("model.layers.{i}.self_attn.query_layernorm", "layers.{i}.attn.q_rope_norm",
               detail=True),
        mg.Tap("model.layers.{i}.self_attn.key_layernorm", "layers.{i}.attn.k_rope_norm",
               detail=True),
    ]
    # spark2_5: model.embedding, the fused q_k_v_proj and the gate logits.
    mg.TAPS[_after(mg, "model.tok_embeddings", "embed"):0] = [
        mg.Tap("model.embedding", "embed"),
    ]
    mg.TAPS[_after(mg, "model.layers.{i}.attention.wqkv", "layers.{i}.attn.qkv"):0] = [
        mg.Tap("model.layers.{i}.self_attn.q_k_v_proj", "layers.{i}.attn.qkv", detail=True),
        mg.Tap("model.layers.{i}.self_attn.g_proj", "layers.{i}.attn.gate", detail=True),
    ]
    # plamo3: model.layers.layers.{i}, attention under "mixer", four norms.
    mg.TAPS[_after(mg, "model.embedding_norm", "norm"):0] = [
        mg.Tap("model.layers.layers.{i}.pre_mixer_norm", "layers.{i}.attn_norm"),
        mg.Tap("model.layers.layers.{i}.mixer.qkv_proj", "layers.{i}.attn.qkv", detail=True),
        mg.Tap("model.layers.layers.{i}.mixer.q_norm", "layers.{i}.attn.q_norm", detail=True),
        mg.Tap("model.layers.layers.{i}.mixer.k_norm", "layers.{i}.attn.k_norm", detail=True),
        mg.Tap("model.layers.layers.{i}.mixer.rope", "layers.{i}.attn.q_rope", call=0,
               detail=True),
        mg.Tap("model.layers.layers.{i}.mixer.rope", "layers.{i}.attn.k_rope", call=1,
               detail=True),
        mg.Tap("model.layers.layers.{i}.mixer.o_proj", "layers.{i}.attn.o"),
        mg.Tap("model.layers.layers.{i}.mixer", "layers.{i}.attn"),
        mg.Tap("model.layers.layers.{i}.post_mixer_norm", "layers.{i}.post_attn_norm"),
        mg.Tap("model.layers.layers.{i}", "layers.{i}.h", residual="post_mixer_norm"),
        mg.Tap("model.layers.layers.{i}.pre_mlp_norm", "layers.{i}.mlp_norm"),
        mg.Tap("model.layers.layers.{i}.mlp.gate_up_proj", "layers.{i}.mlp.gate_up"),
        mg.Tap("model.layers.layers.{i}.mlp.down_proj", "layers.{i}.mlp.down"),
        mg.Tap("model.layers.layers.{i}.mlp", "layers.{i}.mlp"),
        mg.Tap("model.layers.layers.{i}.post_mlp_norm", "layers.{i}.post_mlp_norm"),
        mg.Tap("model.layers.layers.{i}", "layers.{i}"),
    ]
    # gpt_bigcode: gpt2's layout under transformer.*. Only for gpt_bigcode:
    # exaone and qwen (dense_a) share these paths, with other meanings
    # (exaone's attn is a holder whose attn.attention does the work).
    rows = [
        mg.Tap("transformer.wte", "embed"),
        mg.Tap("transformer.wpe", "pos_embed"),
        mg.Tap("transformer.h.{i}.ln_1", "layers.{i}.attn_norm"),
        mg.Tap("transformer.h.{i}.attn.c_attn", "layers.{i}.attn.qkv", detail=True),
        mg.Tap("transformer.h.{i}.attn.c_proj", "layers.{i}.attn.o"),
        mg.Tap("transformer.h.{i}.attn", "layers.{i}.attn"),
        mg.Tap("transformer.h.{i}", "layers.{i}.h", residual="attn"),
        mg.Tap("transformer.h.{i}.ln_2", "layers.{i}.mlp_norm"),
        mg.Tap("transformer.h.{i}.mlp.c_fc", "layers.{i}.mlp.up"),
        mg.Tap("transformer.h.{i}.mlp.c_proj", "layers.{i}.mlp.down"),
        mg.Tap("transformer.h.{i}.mlp", "layers.{i}.mlp"),
        mg.Tap("transformer.h.{i}", "layers.{i}"),
        mg.Tap("transformer.ln_f", "norm"),
    ]
    at = _after(mg, "model.final_layer_norm", "norm")
    mg.TAPS[at:at] = [dataclasses.replace(row, applies=_bigcode) for row in rows]
    _skip_layer_walks(mg, {"plamo3"})
    for k, row in enumerate(mg.TAPS):
        types = skip.get((row.module, row.name, row.residual))
        if types:
            mg.TAPS[k] = dataclasses.replace(row, applies=_unless(row.applies, types))


def gptj_to_hf(weights, config):
    """The inverse of mlx-lm's gptj sanitize: model.* -> transformer.* (the
    lm_head keeps its name) plus each layer's attn.bias (causal mask) and
    attn.masked_bias buffers."""
    out = {("transformer." + k[len("model."):] if k.startswith("model.") else k): v
           for k, v in weights.items()}
    n = config["n_positions"]
    for i in range(config["n_layer"]):
        out[f"transformer.h.{i}.attn.bias"] = mx.tril(mx.ones((n, n))).reshape(1, 1, n, n)
        out[f"transformer.h.{i}.attn.masked_bias"] = mx.array(-1e9)
    return dict(sorted(out.items()))


def spark2_5_to_hf(weights, config):
    """What mlx-lm's spark2_5 sanitize accepts: model.embedding stored as
    model.embed_tokens, rotary inv_freq buffers, and lm_head.weight although
    tied (sanitize drops both)."""
    out = {("model.embed_tokens.weight" if k == "model.embedding.weight" else k): v
           for k, v in weights.items()}
    half = config["head_dim"] // 2
    for i in range(config["num_hidden_layers"]):
        out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = mx.ones((half,))
    if config.get("tie_word_embeddings", True):
        out["lm_head.weight"] = weights["model.embedding.weight"]
    return dict(sorted(out.items()))


def _skip_layer_walks(mg, types):
    """routing_stats / check_block_math walk model.layers as a list of
    layers; plamo3's model.layers is a module (the list is
    model.layers.layers) and has neither MoE nor other recomputed blocks."""
    routing_stats, check_block_math = mg.routing_stats, mg.check_block_math

    def routing_stats_(model, model_type, config, taps):
        return {} if model_type in types else routing_stats(model, model_type, config, taps)

    def check_block_math_(model, model_type, config, taps, compare, have):
        if model_type not in types:
            check_block_math(model, model_type, config, taps, compare, have)

    mg.routing_stats, mg.check_block_math = routing_stats_, check_block_math_


def _bigcode(model_type, config):
    return model_type == "gpt_bigcode"


def _after(mg, module, name):
    """The index just after the TAPS row (module, name)."""
    return next(k for k, r in enumerate(mg.TAPS) if r.module == module and r.name == name) + 1


def _unless(applies, types):
    def check(model_type, config):
        return model_type not in types and (applies is None or applies(model_type, config))
    return check


def _fix_mlx_lm_olmo():
    """mlx-lm 0.32.2's olmo cannot run as it stands: it exits at import
    unless `hf_olmo` (ai2-olmo) is installed, though it uses nothing of it;
    it adds `create_attention_mask`'s result to its scores, which is the
    string "causal" for a multi-token call (a TypeError), and a boolean
    mask had it asked for an array; and under weight_tying it returns
    (logits, cache). Fixed here: an empty `hf_olmo`, the causal mask as the
    additive 0 / -inf it stands for, the logits alone."""
    import sys
    import types

    sys.modules.setdefault("hf_olmo", types.ModuleType("hf_olmo"))
    from mlx_lm.models import base, olmo

    def additive_mask(h, cache=None):
        mask = base.create_attention_mask(h, cache, return_array=True)
        if mask is None or mask.dtype != mx.bool_:
            return mask
        return mx.where(mask, mx.array(0.0, h.dtype), mx.array(-mx.inf, h.dtype))

    olmo.create_attention_mask = additive_mask
    call = olmo.OlmoModel.__call__

    def logits_only(self, inputs, cache=None):
        out = call(self, inputs, cache)
        return out[0] if isinstance(out, tuple) else out

    olmo.OlmoModel.__call__ = logits_only


def register_olmo(mg):
    _fix_mlx_lm_olmo()
    mg.TYPE_UNUSED_BASE_KEYS["olmo"] = list(mg.BASE_CONFIG)
    # 4 heads of 16; the MLP's projection 256 wide (gate and up 128 each);
    # an embedding table of 272 rows for a vocabulary of 256 (the head is
    # as wide as the table).
    mg.TYPE_DEFAULTS["olmo"] = {"d_model": 64, "n_layers": 2, "n_heads": 4,
                                "mlp_hidden_size": 256, "vocab_size": 256,
                                "embedding_size": 272, "rope_theta": 10000.0}
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | {"olmo"}
    mg.CASES += [
        {"name": "olmo", "model_type": "olmo", "config": {}, "seed": 2},
        # The head is the embedding table; mlp_hidden_size from mlp_ratio;
        # rotation of interleaved pairs.
        {"name": "olmo_tied", "model_type": "olmo",
         "config": {"weight_tying": True, "mlp_hidden_size": None, "mlp_ratio": 2,
                    "rope_traditional": True}, "seed": 2},
    ]


def _fix_mlx_lm_bitnet(mg):
    """mlx-lm's BitLinear multiplies by its packed ternary weights in a Metal
    kernel, which cannot run off Metal: the generator runs that kernel's
    arithmetic as MLX ops instead (each byte's bit pair j, minus 1, is the
    weight of output row r + j·out/4; the float32 sums times weight_scale,
    or divided by it with invert_weight_scales). And random weights for it:
    ternary bytes (each pair 0, 1 or 2) and a positive scale."""
    from mlx_lm.models import bitlinear_layers

    def bitlinear_ops(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        x, packed, scale = inputs
        t = dict(template)
        w = packed.astype(mx.int32)
        planes = [((w >> (2 * j)) & 3) - 1 for j in range(4)]
        weight = mx.concatenate(planes, axis=0).astype(mx.float32)
        y = x.astype(mx.float32) @ weight.T
        s = scale[0].astype(mx.float32)
        y = y / s if t["invert_weight_scales"] else y * s
        return [y.astype(output_dtypes[0])]

    bitlinear_layers._bitlinear_kernel = bitlinear_ops
    randomize = mg.randomize_parameters

    def randomize_ternary(model, seed):
        randomize(model, seed)
        layers = [m for _, m in model.named_modules()
                  if isinstance(m, bitlinear_layers.BitLinear)]
        if not layers:
            return
        mx.random.seed(seed + 1)
        for m in layers:
            pairs = mx.random.randint(0, 3, (4,) + m.weight.shape)
            m.weight = sum(pairs[j] * (4 ** j) for j in range(4)).astype(mx.uint8)
            m.weight_scale = mg.WEIGHT_STD * (1.0 + 0.1 * mx.random.normal((1,)))
        mx.eval(model.parameters())

    mg.randomize_parameters = randomize_ternary


def register_bitnet(mg):
    _fix_mlx_lm_bitnet(mg)
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | {"bitnet"}
    mg.TYPE_DEFAULTS["bitnet"] = {"head_dim": 16}
    mg.CASES += [
        {"name": "bitnet", "model_type": "bitnet", "config": {"tie_word_embeddings": True}},
        # As Hugging Face's BitNet checkpoints declare it: a quantization
        # block that is not MLX's (quant_method bitnet); an untied head,
        # which that block leaves dense (modules_to_not_convert).
        {"name": "bitnet_hf_config", "model_type": "bitnet",
         "config": {"tie_word_embeddings": False,
                    "quantization_config": {"quant_method": "bitnet",
                                            "linear_class": "autobitlinear",
                                            "quantization_mode": "offline",
                                            "modules_to_not_convert": ["lm_head"]}}},
    ]
