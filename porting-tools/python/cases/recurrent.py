"""Golden cases of the recurrent mixers of issue #23 (G4): mamba and
falcon_mamba (Mamba-1's selective scan), jamba (Mamba-1 / attention layers,
MoE every other layer), kimi_linear (Kimi Delta Attention: per-channel
decay)."""


import numpy as np


def _only(*types):
    return lambda model_type, config: model_type in types


def _mamba_taps(mg):
    """mamba's mixer beyond mamba2's rows (embed, norm, in_proj, conv, o, ...)."""
    L = "backbone.layers.{i}"

    def T(*args, **kw):
        return mg.Tap(*args, applies=_only("mamba", "falcon_mamba"), **kw)
    return [
        T(f"{L}.mixer.x_proj", "layers.{i}.attn.dbc", detail=True),
        T(f"{L}.mixer.dt_proj", "layers.{i}.attn.dt", detail=True),
    ]


def _conv_hf(mg):
    """Hugging Face's layout of depthwise conv weights: [C, 1, K] where
    mlx-lm keeps [C, K, 1] (the sanitize of these types moves the axis
    back)."""
    def convert(weights, config):
        out = {}
        for key, value in weights.items():
            is_conv = key.endswith(("conv1d.weight", "conv_1d.weight"))
            if is_conv and value.ndim == 3 and value.shape[-1] == 1:
                value = mg.mx.contiguous(mg.mx.moveaxis(value, 2, 1))
            out[key] = value
        return dict(sorted(out.items()))
    return convert, {"format": "pt"}


def _kimi_linear_hf(mg):
    """kimi_linear in Hugging Face's layout: MoE layers under
    block_sparse_moe (per-expert w1/w2/w3, the correction bias under gate),
    q/k/v_conv1d as [C, 1, K], dt_bias [heads, head_dim], kv_b_proj unsplit
    (mlx-lm's sanitize undoes each)."""
    import re

    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

    def convert(weights, config):
        out = {}
        heads = config["linear_attn_config"]["num_heads"]
        for k, v in weights.items():
            m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.(.+)", k)
            if m and f"{m.group(1)}.mlp.switch_mlp.gate_proj.weight" in weights:
                layer, rest = m.group(1), m.group(2)
                sm = re.fullmatch(r"switch_mlp\.(\w+)\.weight", rest)
                if sm:
                    for e in range(v.shape[0]):
                        out[f"{layer}.block_sparse_moe.experts.{e}.{names[sm.group(1)]}.weight"] = v[e]
                elif rest == "e_score_correction_bias":
                    out[f"{layer}.block_sparse_moe.gate.e_score_correction_bias"] = v
                else:
                    out[f"{layer}.block_sparse_moe.{rest}"] = v
                continue
            cm = re.fullmatch(r"(.+self_attn)\.(\w)_conv\.conv\.weight", k)
            if cm:
                out[f"{cm.group(1)}.{cm.group(2)}_conv1d.weight"] = mg.mx.contiguous(mg.mx.moveaxis(v, 2, 1))
            elif k.endswith("self_attn.dt_bias"):
                out[k] = v.reshape(heads, -1)
            elif k.endswith("self_attn.embed_q.weight"):
                up = weights[k.replace("embed_q", "unembed_out")]
                kv_b = mg.mx.concatenate([v.swapaxes(-1, -2), up], axis=1)
                out[k.replace("embed_q", "kv_b_proj")] = kv_b.reshape(-1, kv_b.shape[-1])
            elif k.endswith("self_attn.unembed_out.weight"):
                continue
            else:
                out[k] = v
        return dict(sorted(out.items()))
    return convert, {"format": "pt"}


def _latent_moe_hf(mg):
    """Hugging Face's layout of latent-attention MoE models (longcat_flash,
    bailing_moe_v3, bailing_hybrid): per-expert tensors, kv_b_proj unsplit,
    depthwise convs as [C, 1, K], a bare router weight (mlx-lm's gate.gate_proj
    is HF's gate)."""
    import re

    def convert(weights, config):
        out = {}
        for k, v in weights.items():
            m = re.fullmatch(r"(.+)\.switch_mlp\.(\w+)\.weight", k)
            if m and v.ndim == 3:
                for e in range(v.shape[0]):
                    out[f"{m.group(1)}.experts.{e}.{m.group(2)}.weight"] = v[e]
            elif k.endswith(".embed_q.weight"):
                up = weights[k.replace("embed_q", "unembed_out")]
                kv_b = mg.mx.concatenate([v.swapaxes(-1, -2), up], axis=1)
                out[k.replace("embed_q", "kv_b_proj")] = kv_b.reshape(-1, kv_b.shape[-1])
            elif k.endswith(".unembed_out.weight"):
                continue
            elif k.endswith("conv1d.weight") and v.ndim == 3 and v.shape[-1] == 1:
                out[k] = mg.mx.contiguous(mg.mx.moveaxis(v, 2, 1))
            elif k.endswith(".mlp.gate.gate_proj.weight"):
                out[k.replace(".gate.gate_proj.", ".gate.")] = v
            else:
                out[k] = v
        return dict(sorted(out.items()))
    return convert, {"format": "pt"}


def _except(mg, row, model_type):
    """`row` that does not apply to `model_type`."""
    import dataclasses
    before = row.applies

    def applies(t, config):
        return t != model_type and (before is None or before(t, config))
    return dataclasses.replace(row, applies=applies)


def _wrap_moe_reference(mg):
    """kimi_linear routes as deepseek_v3, with its correction bias beside
    the router (not under it)."""
    original = mg.moe_reference

    def bailing_v3(block, config, x, hybrid=False):
        """bailing_moe_v3's MoE, and bailing_hybrid's (its router under
        gate_proj, softmax or sigmoid scores, renormalised when k > 1): the
        dropped groups' experts at -inf."""
        k = config["num_experts_per_tok"]
        gate = block["gate"]
        logits = x @ mg._f64((gate["gate_proj"] if hybrid else gate)["weight"]).T
        sigmoid = config.get("score_function", "sigmoid") == "sigmoid" or not hybrid
        scores = mg._sigmoid(logits) if sigmoid else mg._softmax(logits)
        bias = gate.get("expert_bias")
        choice = scores + mg._f64(bias) if bias is not None else scores
        n_group, keep = config["n_group"], config["topk_group"]
        grouped = choice.reshape(*choice.shape[:-1], n_group, -1)
        group_scores = np.sort(grouped, -1)[..., -2:].sum(-1)
        worst = np.argsort(group_scores, -1)[..., :n_group - keep]
        for g in range(n_group):
            dropped = (worst == g).any(-1)
            grouped[..., g, :][dropped] = -np.inf
        choice = grouped.reshape(choice.shape)
        inds, margin = mg._topk(np.where(np.isinf(choice), -1e9, choice), k)
        weights = np.take_along_axis(scores, inds, -1)
        if not hybrid or (k > 1 and config.get("norm_topk_prob", True)):
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        weights = weights * config["routed_scaling_factor"]
        sw = block["switch_mlp"]
        wg, wu, wd = (mg._dense(sw[n]) for n in ("gate_proj", "up_proj", "down_proj"))
        # Each stacked projection's optional per-expert bias [E, out].
        bg, bu, bd = (mg._f64(sw[n]["bias"]) if "bias" in sw[n] else 0.0
                      for n in ("gate_proj", "up_proj", "down_proj"))
        hidden = (mg._silu(np.einsum("btd,eid->btei", x, wg) + bg)
                  * (np.einsum("btd,eid->btei", x, wu) + bu))
        experts = np.einsum("btei,edi->bted", hidden, wd) + bd
        y = (np.take_along_axis(experts, inds[..., None], axis=2) * weights[..., None]).sum(2)
        ranked = np.sort(group_scores, -1)
        group_margin = float(np.min(ranked[..., n_group - keep] - ranked[..., n_group - keep - 1]))
        routing = {"experts": inds, "margin": min(margin, 1e9), "group_margin": group_margin}
        return y + mg._glu_mlp(block["shared_experts"], x), routing

    def moe_reference(block, model_type, config, x):
        if model_type == "bailing_moe_v3":
            return bailing_v3(block, config, x)
        if model_type == "bailing_hybrid":
            return bailing_v3(block, config, x, hybrid=True)
        if model_type != "kimi_linear":
            return original(block, model_type, config, x)
        v3_block = {"gate": {"weight": block["gate"]["weight"],
                             "e_score_correction_bias": block["e_score_correction_bias"]},
                    "switch_mlp": block["switch_mlp"]}
        if block.get("shared_experts") is not None:
            v3_block["shared_experts"] = block["shared_experts"]
        v3_config = {"num_experts_per_tok": config["num_experts_per_token"],
                     "n_group": config["num_expert_group"], "topk_group": config["topk_group"],
                     "norm_topk_prob": config["moe_renormalize"],
                     "routed_scaling_factor": config["routed_scaling_factor"]}
        return original(v3_block, "deepseek_v3", v3_config, x)

    mg.moe_reference = moe_reference

    # bailing_moe_linear routes as bailing_moe (whose reference moe_b.py
    # hooks into routing_stats / check_block_math).
    stats, block_math = mg.routing_stats, mg.check_block_math

    def as_bailing(t):
        return "bailing_moe" if t == "bailing_moe_linear" else t

    mg.routing_stats = lambda model, t, config, taps: stats(model, as_bailing(t), config, taps)
    mg.check_block_math = lambda model, t, config, taps, compare, have: block_math(
        model, as_bailing(t), config, taps, compare, have)


def register(mg):
    # rwkv7: 4 heads of 16; LoRA ranks 8 (decay, in-context rate, value)
    # and 16 (gate); layer 1 moves its values toward layer 0's.
    mg.TYPE_UNUSED_BASE_KEYS["rwkv7"] = ["num_attention_heads", "num_key_value_heads",
                                         "rms_norm_eps", "rope_theta", "max_position_embeddings"]
    mg.TYPE_DEFAULTS["rwkv7"] = {
        "head_dim": 16, "norm_eps": 1e-5, "a_low_rank_dim": 8, "v_low_rank_dim": 8,
        "gate_low_rank_dim": 16, "decay_low_rank_dim": 8,
    }
    mg.CASES += [{"name": "rwkv7", "model_type": "rwkv7", "config": {}, "seed": 1}]
    # 4-bit at group 32, as mlx-lm's rwkv7 predicate asks: the embeddings
    # at 8 bits with no group size of their own (MLX's default 64, not the
    # block's 32).
    mg.CASES += [mg._derived("rwkv7", "rwkv7_q4", quantize={"bits": 4, "group_size": 32})]
    # mamba: mixer 128 wide (2 * hidden), state 8, dt rank 4 ("auto" would
    # give ceil(64 / 16) = 4 too), conv 4.
    mamba = {"intermediate_size": 128, "state_size": 8, "conv_kernel": 4, "use_bias": False,
             "use_conv_bias": True, "time_step_rank": 4, "tie_word_embeddings": True}
    for t in ("mamba", "falcon_mamba"):
        mg.TYPE_UNUSED_BASE_KEYS[t] = ["num_attention_heads", "num_key_value_heads",
                                       "rms_norm_eps", "rope_theta", "max_position_embeddings"]
        mg.TYPE_DEFAULTS[t] = dict(mamba)
    mg.CASES += [
        {"name": "mamba", "model_type": "mamba", "config": {}},
        # "auto" dt rank, biased projections, untied head.
        {"name": "mamba_untied", "model_type": "mamba",
         "config": {"time_step_rank": "auto", "use_bias": True, "tie_word_embeddings": False}},
        # Weightless RMS norms of dt, B and C (use_bcdt_rms forced on).
        {"name": "falcon_mamba", "model_type": "falcon_mamba", "config": {"mixer_rms_eps": 1e-5},
         "seed": 1},
    ]
    # jamba: layer 0 Mamba-1 (mixer 128 wide, state 8, dt rank "auto" = 4),
    # layer 1 NoPE attention; layer 1's MLP a MoE (4 experts, top-2).
    mg.TYPE_DEFAULTS["jamba"] = {
        "intermediate_size": 32, "attn_layer_offset": 1, "attn_layer_period": 2,
        "expert_layer_offset": 1, "expert_layer_period": 2, "mamba_d_conv": 4,
        "mamba_d_state": 8, "mamba_expand": 2, "num_experts": 4, "num_experts_per_tok": 2,
        "mamba_dt_rank": "auto", "mamba_proj_bias": False, "mamba_conv_bias": True,
        "tie_word_embeddings": True,
    }
    mg.CASES += [
        {"name": "jamba", "model_type": "jamba", "config": {}},
        # Layer types from layers_block_type (attention first), every layer
        # MoE, biased mamba projections, untied head.
        {"name": "jamba_block_types", "model_type": "jamba",
         "config": {"layers_block_type": ["attention", "mamba"], "expert_layer_period": 1,
                    "mamba_proj_bias": True, "tie_word_embeddings": False}, "seed": 2},
    ]
    # kimi_linear: layer 0 KDA (4 heads of 16, conv 4) with a dense MLP,
    # layer 1 NoPE latent attention (latent 32, q 16 + 8 unrotated, v 16)
    # with a MoE (4 experts of 16 in 2 groups, 1 kept, top-2, a shared
    # expert, renormalised and scaled).
    mg.TYPE_DEFAULTS["kimi_linear"] = {
        "intermediate_size": 64, "head_dim": 16, "model_max_length": 512,
        "linear_attn_config": {"num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4,
                               "kda_layers": [1]},
        "num_experts": 4, "moe_intermediate_size": 16, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "num_experts_per_token": 2, "num_shared_experts": 1, "moe_renormalize": True,
        "routed_scaling_factor": 1.5, "first_k_dense_replace": 1, "num_expert_group": 2,
        "topk_group": 1, "moe_router_activation_func": "sigmoid",
    }
    mg.CASES += [{"name": "kimi_linear", "model_type": "kimi_linear", "config": {}, "seed": 1}]
    # olmo_hybrid: DeltaNet (2 key heads of 16, 4 value heads of 16, conv 4,
    # negative eigenvalues), attention (post-norm, full-width q/k norms);
    # the default pattern puts attention at layer 3 of 4.
    mg.TYPE_DEFAULTS["olmo_hybrid"] = {
        "intermediate_size": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
        "linear_allow_neg_eigval": True, "attention_bias": False,
        "layer_types": ["linear_attention", "full_attention"],
    }
    mg.CASES += [
        {"name": "olmo_hybrid", "model_type": "olmo_hybrid", "config": {}, "seed": 3},
        # Beta in [0, 1]; rope_parameters; the default pattern; tied.
        {"name": "olmo_hybrid_default_layers", "model_type": "olmo_hybrid",
         "config": {"layer_types": None, "num_hidden_layers": 4, "linear_allow_neg_eigval": False,
                    "intermediate_size": 16,
                    "rope_parameters": {"rope_theta": 50000.0}, "tie_word_embeddings": True}},
    ]
    # The config fuzzer's finding: layer_types decides the layer count, not
    # num_hidden_layers (mlx-lm builds one layer per entry).
    mg.CASES += [mg._derived("olmo_hybrid", "olmo_hybrid_layer_count", {"num_hidden_layers": 1})]
    # bailing_moe_v3: layer 0 KDA (4 heads of 16, lower bound -5) with a
    # dense MLP, layer 1 latent attention (q rank 16, latent 32, q 16 + 8
    # rope, v 16, gated heads) with a MoE: 4 experts in 2 groups, 1 kept,
    # top-2, renormalised, scaled, a shared expert. (A top-k beyond the kept
    # experts would pick among -inf ties: the moe unit test covers that fill.)
    mg.TYPE_UNUSED_BASE_KEYS["bailing_moe_v3"] = ["num_key_value_heads"]
    mg.TYPE_DEFAULTS["bailing_moe_v3"] = {
        "intermediate_size": 64, "moe_intermediate_size": 16,
        "moe_shared_expert_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
        "num_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
        "routed_scaling_factor": 1.5, "layer_group_size": 2, "head_dim": 16, "q_lora_rank": 16,
        "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "short_conv_kernel_size": 4, "kda_lower_bound": -5.0, "kda_safe_gate": True,
        "no_kda_lora": True, "rope_interleave": True,
    }
    mg.CASES += [{"name": "bailing_moe_v3", "model_type": "bailing_moe_v3", "config": {}}]
    # Its mlp.gate returns (indices, weights), not logits.
    mg.NON_LINEAR_ROUTER_TYPES = mg.NON_LINEAR_ROUTER_TYPES | {"bailing_moe_v3"}
    # bailing_moe_linear: layer 0 lightning attention (4 heads of 16, q/k
    # norms, rope on half, g_norm in 2 groups) with a dense MLP, layer 1
    # softmax attention with bailing_moe's MoE (sigmoid, expert bias, 2
    # groups of 2, top-2, a shared expert).
    mg.TYPE_DEFAULTS["bailing_moe_linear"] = {
        **mg.TYPE_DEFAULTS["bailing_moe"], "layer_group_size": 2, "group_norm_size": 2,
        "use_qk_norm": True, "partial_rotary_factor": 0.5, "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True, "n_group": 2, "topk_group": 1,
        "routed_scaling_factor": 1.5,
    }
    mg.CASES += [
        {"name": "bailing_moe_linear", "model_type": "bailing_moe_linear", "config": {}, "seed": 2},
        # 4 layers (lightning, attention, lightning, attention): the decay
        # changes with the layer; 6 heads (ALiBi slopes of a non-power of 2).
        {"name": "bailing_moe_linear_6_heads", "model_type": "bailing_moe_linear",
         "config": {"num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
                    "hidden_size": 48, "head_dim": 8, "intermediate_size": 32,
                    "moe_intermediate_size": 16, "use_qkv_bias": True}},
    ]
    # bailing_hybrid: layer 0 lightning attention (4 heads of 16), layer 1
    # latent attention (q rank 16, latent 32, q 16 + 8 rope, v 16) with a
    # MoE (sigmoid, expert bias, 2 groups of 2 masked to -inf, top-2,
    # renormalised, scaled, a shared expert).
    mg.TYPE_UNUSED_BASE_KEYS["bailing_hybrid"] = []
    mg.TYPE_DEFAULTS["bailing_hybrid"] = {
        "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 4,
        "num_experts_per_tok": 2, "num_shared_experts": 1, "n_group": 2, "topk_group": 1,
        "first_k_dense_replace": 1, "layer_group_size": 2, "group_norm_size": 2,
        "routed_scaling_factor": 1.5, "head_dim": 16, "kv_lora_rank": 32,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "q_lora_rank": 16,
        # mlx-lm's defaults, written out (the MoE reference reads them).
        "score_function": "sigmoid", "norm_topk_prob": True,
        "moe_router_enable_expert_bias": True, "use_qk_norm": True, "partial_rotary_factor": 0.5,
    }
    mg.CASES += [
        {"name": "bailing_hybrid", "model_type": "bailing_hybrid", "config": {}},
        # The config fuzzer's finding: 2 groups of 3, top-3 = the kept
        # group, whose experts may score below 0 (sigmoid + expert bias) and
        # still beat the dropped ones at -inf (a 0 fill would not).
        {"name": "bailing_hybrid_6_experts", "model_type": "bailing_hybrid",
         "config": {"num_experts": 6, "num_experts_per_tok": 3}},
        # use_bias: biases on the experts, the MLPs and the lightning
        # layers' output; use_qkv_bias on the latent attention's projections.
        {"name": "bailing_hybrid_bias", "model_type": "bailing_hybrid",
         "config": {"use_bias": True, "use_qkv_bias": True}},
    ]
    mg.NON_LINEAR_ROUTER_TYPES = mg.NON_LINEAR_ROUTER_TYPES | {"bailing_moe_linear", "bailing_hybrid"}
    # recurrent_gemma: recurrent, attention, recurrent (3 layers cycling 2
    # block types): RG-LRU 64 wide in 4 heads, conv 4; local attention with
    # a window of 4 (< the prompt); MLP 32 wide; logits capped at 30.
    mg.TYPE_UNUSED_BASE_KEYS["recurrent_gemma"] = ["tie_word_embeddings"]
    mg.TYPE_DEFAULTS["recurrent_gemma"] = {
        "num_hidden_layers": 3, "attention_bias": False, "conv1d_width": 4,
        "intermediate_size": 64, "logits_soft_cap": 30.0, "attention_window_size": 4,
        "block_types": ["recurrent", "attention"], "embeddings_scale_by_sqrt_dim": True,
    }
    mg.CASES += [
        {"name": "recurrent_gemma", "model_type": "recurrent_gemma", "config": {}},
        # No lm_head (tied to the embedding), no embedding scale.
        {"name": "recurrent_gemma_tied", "model_type": "recurrent_gemma",
         "config": {"embeddings_scale_by_sqrt_dim": False, "logits_soft_cap": 0.0},
         "drop_params": ["lm_head.weight"]},
    ]
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | {"kimi_linear", "olmo_hybrid", "bailing_moe_v3",
                                                       "bailing_moe_linear", "bailing_hybrid",
                                                       "recurrent_gemma"}
    # olmo2's attention: q/k norms over all heads.
    mg.FULL_WIDTH_QK_NORM_TYPES = mg.FULL_WIDTH_QK_NORM_TYPES | {"olmo_hybrid"}
    # Its post_attention_layernorm is the MLP's input norm in DeltaNet layers
    # and the attention output's norm in attention layers: no tap of it.
    # Nor "layers.{i}.h" = x + self_attn (its attention layers norm the
    # attention output first), as for the scaled-residual types.
    mg.SCALED_RESIDUAL_TYPES = mg.SCALED_RESIDUAL_TYPES | {"olmo_hybrid"}
    mg.TAPS[:] = [_except(mg, row, "olmo_hybrid")
                  if row.module == "model.layers.{i}.post_attention_layernorm" else row
                  for row in mg.TAPS]
    _wrap_moe_reference(mg)
    # The convolutions in Hugging Face's [C, 1, K] layout (moveaxis rules).
    mg.HF_LAYOUTS["conv_hf"] = _conv_hf(mg)
    mg.HF_LAYOUTS["kimi_linear"] = _kimi_linear_hf(mg)
    mg.CASES += [mg._derived("kimi_linear", "kimi_linear_hf", hf_layout="kimi_linear")]
    mg.HF_LAYOUTS["latent_moe_hf"] = _latent_moe_hf(mg)
    mg.CASES += [mg._derived(t, f"{t}_hf_kv_b", hf_layout="latent_moe_hf")
                 for t in ("bailing_moe_v3", "bailing_hybrid")]
    mg.CASES += [mg._derived(t, f"{t}_hf", hf_layout="conv_hf")
                 for t in ("mamba", "jamba", "olmo_hybrid", "bailing_moe_v3", "recurrent_gemma")]
    k = next(k for k, row in enumerate(mg.TAPS) if row.module == "backbone.layers.{i}.mixer.norm")
    mg.TAPS[k:k] = _mamba_taps(mg)
