"""Golden cases of the moe_b group (issue #18): ernie4_5, ernie4_5_moe,
olmoe, granitemoe, minimax (+ minimax_m2), afmoe, bailing_moe, lfm2_moe, and
the deepseek_v3 aliases kimi_k2 and joyai_llm_flash.

Besides cases, defaults and tap rows, this module extends make_golden's MoE
reference (moe_reference, routing_stats, check_block_math) to these types:
each routing is recomputed in numpy (float64) from the config, so the seed
search sees their routing margins and every MoE block is checked."""
import numpy as np

# MODEL_REMAPPING aliases: the reference code of the type they stand for.
ALIASES = {"minimax_m2": "minimax", "kimi_k2": "deepseek_v3", "joyai_llm_flash": "deepseek_v3"}
MOE_MODULES = ("mlp", "block_sparse_moe", "feed_forward")


def _moe_block(layer):
    """The layer's MoE block (SwitchGLU experts under switch_mlp or experts)."""
    for name in MOE_MODULES:
        block = layer.get(name) if hasattr(layer, "get") else None
        if hasattr(block, "get") and ("switch_mlp" in block or "experts" in block):
            return block
    return None


def _top2_sum(g):
    return np.sort(g, axis=-1)[..., -2:].sum(axis=-1)


def _reference(mg, t, block, c, x):
    """(output, routing) of a MoE block of type t for x [B, T, D] (float64)."""
    routing = {}
    k = c.get("num_experts_per_tok")
    lin = mg._apply_linear
    shared = None
    experts = block.get("switch_mlp") or block.get("experts")
    if t == "ernie4_5_moe":
        k = c.get("moe_k", 1)
        logits = lin(block["gate"], x)
        scores = mg._sigmoid(logits) if c.get("moe_gate_act") == "sigmoid" else mg._softmax(logits)
        inds, routing["margin"] = mg._topk(scores, k)
        w = np.take_along_axis(scores, inds, -1)
        w = w / np.maximum(w.sum(-1, keepdims=True), 1e-12)
        shared = block.get("shared_experts")
    elif t == "olmoe":
        scores = mg._softmax(lin(block["gate"], x))
        inds, routing["margin"] = mg._topk(scores, k)
        w = np.take_along_axis(scores, inds, -1)
        if c.get("norm_topk_prob"):
            w = w / w.sum(-1, keepdims=True)
    elif t == "granitemoe":
        logits = lin(block["router"]["layer"], x)
        inds, routing["margin"] = mg._topk(logits, k)
        w = mg._softmax(np.take_along_axis(logits, inds, -1))
    elif t in ("minimax", "lfm2_moe"):
        scores = mg._sigmoid(lin(block["gate"], x))
        bias = block.get("e_score_correction_bias", block.get("expert_bias"))
        choice = scores + mg._f64(bias) if bias is not None else scores
        inds, routing["margin"] = mg._topk(choice, k)
        w = np.take_along_axis(scores, inds, -1)
        if t == "minimax":
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        else:
            if c.get("norm_topk_prob"):
                w = w / (w.sum(-1, keepdims=True) + 1e-6)
            w = w * c.get("routed_scaling_factor", 1.0)
    elif t in ("afmoe", "bailing_moe"):
        if t == "afmoe":
            logits, bias = lin(block["router"]["gate"], x), block.get("expert_bias")
            sigmoid = c.get("score_func", "sigmoid") == "sigmoid"
            norm, scale = c.get("route_norm", True), c.get("route_scale", 2.826)
            shared = block.get("shared_experts")
        else:
            logits, bias = lin(block["gate"]["gate_proj"], x), block["gate"].get("expert_bias")
            sigmoid = c.get("score_function", "softmax") == "sigmoid"
            norm, scale = c.get("norm_topk_prob"), c.get("routed_scaling_factor", 1.0)
            shared = block.get("shared_experts")
        scores = mg._sigmoid(logits) if sigmoid else mg._softmax(logits)
        choice = scores + mg._f64(bias) if bias is not None else scores
        n_group, topk_group = c.get("n_group", 1), c.get("topk_group", 1)
        if n_group > 1:
            choice, routing["group_margin"] = mg._group_limit(choice, n_group, topk_group,
                                                              _top2_sum)
        inds, routing["margin"] = mg._topk(choice, k)
        w = np.take_along_axis(scores, inds, -1)
        if norm and k > 1:
            w = w / (w.sum(-1, keepdims=True) + (1e-20 if t == "bailing_moe" else 0.0))
        w = w * scale
    else:
        raise RuntimeError(f"no MoE reference for {t}")
    wg, wu, wd = (mg._dense(experts[n]) for n in ("gate_proj", "up_proj", "down_proj"))
    hidden = mg._silu(np.einsum("btd,eid->btei", x, wg)) * np.einsum("btd,eid->btei", x, wu)
    out = np.einsum("btei,edi->bted", hidden, wd)
    y = (np.take_along_axis(out, inds[..., None], axis=2) * w[..., None]).sum(axis=2)
    if shared is not None:
        y = y + mg._glu_mlp(shared, x)
    routing["experts"] = inds
    return y, routing


REFERENCE_TYPES = {"ernie4_5_moe", "olmoe", "granitemoe", "minimax", "afmoe", "bailing_moe",
                   "lfm2_moe"}


def _patch_reference(mg):
    orig_routing_stats, orig_block_math = mg.routing_stats, mg.check_block_math

    def routing_stats(model, model_type, config, taps):
        t = ALIASES.get(model_type, model_type)
        if t not in REFERENCE_TYPES:
            return orig_routing_stats(model, t, config, taps)
        stats = {}
        for i, layer in enumerate(mg.walk(model, "model.layers") or []):
            block = _moe_block(layer)
            if block is not None and f"layers.{i}.mlp_norm" in taps:
                x = taps[f"layers.{i}.mlp_norm"].astype(np.float64)
                stats[i] = _reference(mg, t, block, config, x)[1]
        return stats

    def check_block_math(model, model_type, config, taps, compare, have):
        t = ALIASES.get(model_type, model_type)
        if t not in REFERENCE_TYPES:
            return orig_block_math(model, t, config, taps, compare, have)
        for i, layer in enumerate(mg.walk(model, "model.layers") or []):
            p, block = f"layers.{i}", _moe_block(layer)
            if block is not None and have(f"{p}.mlp_norm", f"{p}.mlp"):
                want, _ = _reference(mg, t, block, config, taps[f"{p}.mlp_norm"].astype(np.float64))
                compare(f"{p}.mlp == MoE reference({p}.mlp_norm)", taps[f"{p}.mlp"], want)

    mg.routing_stats, mg.check_block_math = routing_stats, check_block_math


def _insert_after(mg, module, name, rows):
    """Insert TAPS rows right after the row (module, name), leaving out rows
    another case module has already added for every type."""
    have = {(r.module, r.name) for r in mg.TAPS if r.applies is None}
    k = next(j for j, r in enumerate(mg.TAPS) if r.module == module and r.name == name)
    mg.TAPS[k + 1:k + 1] = [r for r in rows if (r.module, r.name) not in have]


def _uncompile_bailing_aggregate():
    """In the config fuzzer only: mlx-lm's bailing_moe sums the expert outputs
    with an mx.compile(shapeless=True) function, which crashes the process
    (segfault / "free(): invalid pointer", mlx 0.32.2 CPU) after a few models
    of other shapes were run through it; the same math uncompiled."""
    import sys
    main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    if not main.endswith("fuzz_configs.py"):
        return
    import mlx_lm.models.bailing_moe as bailing

    def aggregate_expert_outputs(expert_outputs, scores):
        return (expert_outputs * scores[..., None]).sum(axis=-2).astype(expert_outputs.dtype)

    bailing.aggregate_expert_outputs = aggregate_expert_outputs


def register(mg):
    register_minimax_m3(mg)
    _patch_reference(mg)
    _uncompile_bailing_aggregate()
    Tap = mg.Tap
    moe_types = REFERENCE_TYPES | set(ALIASES)
    # Generic tap checks only (full-width q/k norms, MLA, sandwich norms, ...).
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | moe_types
    mg.NON_LINEAR_ROUTER_TYPES = mg.NON_LINEAR_ROUTER_TYPES | {"kimi_k2", "joyai_llm_flash"}
    mg.FULL_WIDTH_QK_NORM_TYPES = mg.FULL_WIDTH_QK_NORM_TYPES | {"olmoe", "minimax", "minimax_m2"}
    mg.SCALED_RESIDUAL_TYPES = mg.SCALED_RESIDUAL_TYPES | {"granitemoe"}

    # bailing_moe (mlx_lm.models.bailing_moe): its own module names.
    _insert_after(mg, "model.tok_embeddings", "embed", [Tap("model.word_embeddings", "embed")])
    _insert_after(mg, "model.layers.{i}.attention.wqkv", "layers.{i}.attn.qkv", [
        Tap("model.layers.{i}.attention.query_key_value", "layers.{i}.attn.qkv", detail=True),
        # Per head, after the head transpose: [B, H, T, D] already.
        Tap("model.layers.{i}.attention.query_layernorm", "layers.{i}.attn.q_norm", detail=True),
        Tap("model.layers.{i}.attention.key_layernorm", "layers.{i}.attn.k_norm", detail=True),
    ])
    _insert_after(mg, "model.layers.{i}.attention.wo", "layers.{i}.attn", [
        Tap("model.layers.{i}.attention.dense", "layers.{i}.attn.o"),
        Tap("model.layers.{i}.attention.dense", "layers.{i}.attn"),
    ])
    mg.NON_LINEAR_ROUTER_TYPES = mg.NON_LINEAR_ROUTER_TYPES | {"bailing_moe"}
    # afmoe: the attention's output gate sigmoid(gate_proj(x)) (before
    # o_proj), sandwich norms with their own names.
    _insert_after(mg, "model.layers.{i}.attention.rope", "layers.{i}.attn.k_rope", [
        Tap("model.layers.{i}.self_attn.gate_proj", "layers.{i}.attn.gate", detail=True)])
    _insert_after(mg, "model.layers.{i}.pre_feedforward_layernorm", "layers.{i}.mlp_norm", [
        Tap("model.layers.{i}.pre_mlp_layernorm", "layers.{i}.mlp_norm")])
    _insert_after(mg, "model.layers.{i}.post_feedforward_layernorm", "layers.{i}.post_mlp_norm", [
        Tap("model.layers.{i}.post_mlp_layernorm", "layers.{i}.post_mlp_norm")])
    mg.POST_NORM_TYPES = mg.POST_NORM_TYPES | {"afmoe"}
    mg.HEAD_MAJOR_QK_NORM_TYPES = mg.HEAD_MAJOR_QK_NORM_TYPES | {"afmoe"}
    # lfm2_moe's dense feed-forward (its MoE ones have the feed_forward row).
    lfm2_moe = lambda t, c: t == "lfm2_moe"  # noqa: E731
    _insert_after(mg, "model.layers.{i}.ffn_norm", "layers.{i}.mlp_norm", [
        Tap(f"model.layers.{{i}}.feed_forward.{m}_proj", f"layers.{{i}}.mlp.{m}", applies=lfm2_moe)
        for m in ("gate", "up", "down")])

    mg.TYPE_DEFAULTS.update({
        # head_dim is a required (nullable) field of ernie4_5's ModelArgs.
        "ernie4_5": {"head_dim": None, "use_bias": False, "tie_word_embeddings": False},
        "ernie4_5_moe": {"head_dim": None, "use_bias": False, "tie_word_embeddings": False,
                         "intermediate_size": 64, "moe_num_experts": 4, "moe_k": 2,
                         "moe_intermediate_size": 32},
        "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
                  "norm_topk_prob": False},
        "granitemoe": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                       "attention_multiplier": 0.15, "logits_scaling": 2.0,
                       "attention_bias": False, "num_local_experts": 4,
                       "num_experts_per_tok": 2, "intermediate_size": 32},
        # shared_intermediate_size is required but unused (no shared expert).
        "minimax": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
                    "shared_intermediate_size": 32, "rotary_dim": 8},
    })
    # norm_eps instead of rms_norm_eps; always tied (the key is not read).
    mg.TYPE_UNUSED_BASE_KEYS["lfm2_moe"] = ["rms_norm_eps", "tie_word_embeddings"]
    mg.TYPE_DEFAULTS["lfm2_moe"] = {
        "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "use_expert_bias": True, "num_dense_layers": 1,
        "rope_theta": 1000000.0, "layer_types": ["conv", "full_attention"]}
    mg.TYPE_DEFAULTS["bailing_moe"] = {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "num_shared_experts": 1, "norm_topk_prob": True, "first_k_dense_replace": 1,
        "intermediate_size": 64, "n_group": 1, "topk_group": 1}
    mg.TYPE_DEFAULTS["afmoe"] = {
        "head_dim": 16, "intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "num_shared_experts": 1, "num_dense_layers": 1,
        "route_norm": True, "route_scale": 2.826, "score_func": "sigmoid", "n_group": 1,
        "topk_group": 1, "sliding_window": 4, "mup_enabled": True,
        "layer_types": ["sliding_attention", "full_attention"]}
    mg.TYPE_DEFAULTS["minimax_m2"] = dict(mg.TYPE_DEFAULTS["minimax"])
    for alias in ("kimi_k2", "joyai_llm_flash"):
        mg.TYPE_DEFAULTS[alias] = dict(mg.TYPE_DEFAULTS["deepseek_v3"])

    mg.CASES += [
        # Biases on every projection (use_bias), interleaved rope, head_dim
        # 24 with 4 heads (attention 96 wide, not hidden_size).
        {"name": "ernie4_5", "model_type": "ernie4_5",
         "config": {"use_bias": True, "head_dim": 24, "intermediate_size": 64}, "seed": 0},
        # Layers 0 and 2 dense (moe_layer_start_index 1, moe_layer_end_index
        # 1), layer 1 MoE: softmax over 4 experts, top-2 renormalised, plus
        # one ungated shared expert.
        {"name": "ernie4_5_moe", "model_type": "ernie4_5_moe",
         "config": {"num_hidden_layers": 3, "moe_layer_start_index": 1,
                    "moe_layer_end_index": 1, "moe_num_shared_experts": 1,
                    "intermediate_size": 48, "tie_word_embeddings": True}, "seed": 1},
        # Sigmoid scores (moe_gate_act), every second layer MoE
        # (moe_layer_interval 2), no shared expert.
        {"name": "ernie4_5_moe_sigmoid", "model_type": "ernie4_5_moe",
         "config": {"moe_gate_act": "sigmoid", "moe_layer_interval": 2}, "seed": 0},
        # q/k RMS norms over all heads; softmax top-2 of 4 renormalised;
        # q/k/v/o biases.
        {"name": "olmoe", "model_type": "olmoe",
         "config": {"norm_topk_prob": True, "attention_bias": True}, "seed": 3},
        # Granite multipliers around top-2-of-4 experts (softmax over the
        # chosen logits); q/k/v/o biases.
        {"name": "granitemoe", "model_type": "granitemoe", "config": {"attention_bias": True}, "seed": 0},
        # Full-width q/k norms, rope on 8 of 16 dims, sigmoid routing with a
        # correction bias, renormalised.
        {"name": "minimax", "model_type": "minimax", "config": {}, "seed": 4},
        # Conv layer 0 dense (num_dense_layers 1); attention layer 1 and conv
        # layer 2 MoE: sigmoid scores, choice with expert_bias, top-2 of 4
        # renormalised, scaled by 1.5.
        {"name": "lfm2_moe", "model_type": "lfm2_moe",
         "config": {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"],
                    "routed_scaling_factor": 1.5}, "seed": 12},
        # Layer 0 dense (first_k_dense_replace 1), layer 1 MoE: softmax over
        # 4, top-2 renormalised, scaled by 1.5, plus a shared expert. Fused
        # qkv with biases, per-head q/k norms, rope on half of each head.
        {"name": "bailing_moe", "model_type": "bailing_moe",
         "config": {"use_qkv_bias": True, "use_qk_norm": True, "partial_rotary_factor": 0.5,
                    "routed_scaling_factor": 1.5}, "seed": 2},
        # Sigmoid scores with an expert bias, 2 groups of 2 (the best by its
        # top-2 sum kept), shared expert 24 wide; rotary_dim 4.
        {"name": "bailing_moe_sigmoid", "model_type": "bailing_moe",
         "config": {"score_function": "sigmoid", "moe_router_enable_expert_bias": True,
                    "n_group": 2, "topk_group": 1, "moe_shared_expert_intermediate_size": 24,
                    "rotary_dim": 4, "use_qk_norm": True}, "seed": 0},
        # Hidden 48 (attention 4 x 16 = 64 wide). Layers sliding (rope, window 4
        # < the prompt), global (NoPE), sliding;
        # layer 0 dense (num_dense_layers 1), layers 1-2 MoE: sigmoid scores,
        # choice with expert_bias, top-2 of 4 renormalised and scaled, plus a
        # shared expert; output-gated attention, 4 sandwich norms, muP
        # embedding scale.
        {"name": "afmoe", "model_type": "afmoe",
         "config": {"num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 32,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
         "seed": 1},
        # Softmax scores, 8 experts in 4 groups, the 2 best groups (by their
        # top-2 sum) kept, top-3, renormalised; no shared expert.
        {"name": "afmoe_softmax_groups", "model_type": "afmoe",
         "config": {"score_func": "softmax", "num_experts": 8, "num_experts_per_tok": 3,
                    "moe_intermediate_size": 8, "n_group": 4, "topk_group": 2,
                    "num_shared_experts": 0, "route_scale": 1.0,
                    "layer_types": ["full_attention", "sliding_attention"]}, "seed": 1},
    ]
    mg.CASES += [
        mg._derived("minimax", "minimax_m2", model_type="minimax_m2"),
        mg._derived("deepseek_v3", "kimi_k2", model_type="kimi_k2"),
        mg._derived("deepseek_v3", "joyai_llm_flash", model_type="joyai_llm_flash"),
    ]
    # 4-bit, group 32, as mlx_lm.convert quantizes them: each model's own
    # quant_predicate makes its routers 8-bit (group 64) under mlx-lm's module
    # names (mlp.router.gate, mlp.gate.gate_proj, block_sparse_moe.router.layer;
    # granitemoe also o_proj and lm_head), which the specs keep for that.
    mg.CASES += [
        mg._derived("afmoe_softmax_groups", "afmoe_q4", quantize={"bits": 4, "group_size": 32},
                    seed=3),
        mg._derived("bailing_moe_sigmoid", "bailing_moe_q4", quantize={"bits": 4, "group_size": 32},
                    seed=3),
        mg._derived("granitemoe", "granitemoe_q4", {"intermediate_size": 64},
                    quantize={"bits": 4, "group_size": 32}, seed=0),
    ]


def register_minimax_m3(mg):
    """minimax_m3_vl (the text model of the VLM, keys under text_config): 3
    layers, the first dense, then MoE (4 gpt-oss SwiGLU experts, top-2 by
    sigmoid + correction bias, renormalised, x 2, plus a shared expert);
    block-sparse attention on layers 1 and 2: an indexer of 2 heads of 16
    (each serving 2 of the 4 query heads) over blocks of 2 keys, keeping
    the local block and the best other one, so that past the fourth
    position every query attends to 2 of its blocks."""
    mg.TYPE_UNUSED_BASE_KEYS["minimax_m3_vl"] = list(mg.BASE_CONFIG)
    text = {
        "hidden_size": 64, "intermediate_size": 32, "dense_intermediate_size": 64,
        "shared_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 3, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "head_dim": 16, "partial_rotary_factor": 0.5, "vocab_size": 256,
        "tie_word_embeddings": False, "routed_scaling_factor": 2.0, "use_qk_norm": True,
        "use_gemma_norm": True, "swiglu_limit": 7.0,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "sparse_attention_config": {
            "sparse_num_index_heads": 2, "sparse_index_dim": 16, "sparse_block_size": 2,
            "sparse_topk_blocks": 2, "sparse_local_block": 1,
            "sparse_attention_freq": [0, 1, 1],
        },
    }
    mg.CASES += [{"name": "minimax_m3_vl", "model_type": "minimax_m3_vl", "seed": 0,
                  "config": {"text_config": text}}]
