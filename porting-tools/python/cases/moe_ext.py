"""Golden cases of the MoE extensions (issue #23, G2): phixtral (+ its alias
phi-msft: plain GELU experts with biases), phimoe (sparsemixer routing),
nemotron_h (Mamba-2 / attention / relu² MLP / MoE layers by pattern, plain
relu² experts), longcat_flash (identity experts, router bias) and step3p5
(clamped SwiGLU)."""

import numpy as np


def _only(*types):
    return lambda model_type, config: model_type in types


def _wrap_moe_reference(mg):
    """The routing of these types recomputed in numpy (float64), so the
    seed search sees their routing margins and check_block_math their
    blocks."""
    original = mg.moe_reference

    def clamped_glu(g, u, limit):
        h = mg._silu(g)
        if limit:
            h, u = np.minimum(h, limit), np.clip(u, -limit, limit)
        return h * u

    def step3p5(block, config, x):
        k = config["moe_top_k"]
        gate = block["gate"]
        scores = mg._sigmoid(mg._apply_linear(gate["gate"], x))
        inds, margin = mg._topk(scores + mg._f64(gate["router_bias"]), k)
        weights = np.take_along_axis(scores, inds, -1)
        if config.get("norm_expert_weight", True):
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
        weights = weights * config.get("moe_router_scaling_factor", 3.0)
        sw = block["switch_mlp"]
        limit = getattr(sw.activation, "limit", None)
        wg, wu, wd = (mg._dense(sw[n]) for n in ("gate_proj", "up_proj", "down_proj"))
        hidden = clamped_glu(np.einsum("btd,eid->btei", x, wg), np.einsum("btd,eid->btei", x, wu),
                             limit)
        experts = np.einsum("btei,edi->bted", hidden, wd)
        chosen = np.take_along_axis(experts, inds[..., None], axis=2)
        y = (chosen * weights[..., None]).sum(axis=2)
        se = block["share_expert"]
        shared = clamped_glu(mg._apply_linear(se["gate_proj"], x), mg._apply_linear(se["up_proj"], x),
                             se.limit)
        return y + mg._apply_linear(se["down_proj"], shared), {"experts": inds, "margin": margin}

    def moe_reference(block, model_type, config, x):
        if model_type == "step3p5":
            return step3p5(block, config, x)
        if model_type != "phimoe":
            return original(block, model_type, config, x)
        k = config["num_experts_per_tok"]
        eps = config.get("router_jitter_noise", 0.01)
        logits = mg._apply_linear(block["gate"], x)
        masked = logits.copy()
        inds, weights = [], []
        for _ in range(k):
            pick = masked.argmax(-1)[..., None]
            best = np.take_along_axis(masked, pick, -1)
            factor = np.maximum(np.abs(logits), best)
            band = np.where((best - logits) / factor > 2 * eps, -np.inf, masked)
            weights.append(np.take_along_axis(mg._softmax(band), pick, -1))
            inds.append(pick)
            np.put_along_axis(masked, pick, -np.inf, -1)
        inds = np.concatenate(inds, -1)
        weights = np.concatenate(weights, -1)
        srt = np.sort(logits, -1)
        margin = float(np.min(srt[..., -k] - srt[..., -k - 1]))
        sw = block["switch_mlp"]
        wg, wu, wd = (mg._dense(sw[n]) for n in ("gate_proj", "up_proj", "down_proj"))
        hidden = mg._silu(np.einsum("btd,eid->btei", x, wg)) * np.einsum("btd,eid->btei", x, wu)
        experts = np.einsum("btei,edi->bted", hidden, wd)
        chosen = np.take_along_axis(experts, inds[..., None], axis=2)
        return (chosen * weights[..., None]).sum(axis=2), {"experts": inds, "margin": margin}

    mg.moe_reference = moe_reference


STEP3P5_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight",
                  "q_norm.weight", "k_norm.weight", "model.norm.weight")


def _step3p5_vanilla(mg):
    """step3p5 as its vanilla checkpoints store it: experts under moe.,
    share_expert beside mlp, zero-centred norms (w for 1 + w); mlx-lm's
    sanitize renames and adds 1 back."""
    def convert(weights, config):
        out = {}
        for k, v in weights.items():
            k2 = (k.replace(".mlp.switch_mlp.", ".moe.").replace(".mlp.gate.gate.", ".moe.gate.")
                  .replace(".mlp.gate.router_bias", ".moe.router_bias")
                  .replace(".mlp.share_expert.", ".share_expert."))
            if k.endswith(STEP3P5_NORMS):
                v = v - 1.0
            out[k2] = v
        return dict(sorted(out.items()))
    return convert, {"format": "pt"}


def _phixtral_taps(mg):
    """phixtral's modules: transformer.embd.wte, transformer.h.{i}.{ln,
    mixer, moe}, lm_head.{ln, linear}."""
    H = "transformer.h.{i}"

    def T(*args, **kw):
        return mg.Tap(*args, applies=_only("phixtral", "phi-msft"), **kw)
    return [
        T("transformer.embd.wte", "embed"),
        T(f"{H}.ln", "layers.{i}.attn_norm"),
        T(f"{H}.mixer.Wqkv", "layers.{i}.attn.qkv", detail=True),
        T(f"{H}.mixer.out_proj", "layers.{i}.attn"),
        T(f"{H}.moe", "layers.{i}.mlp"),
        T(H, "layers.{i}"),
        T("lm_head.ln", "norm"),
    ]


def register(mg):
    # phixtral: its own key names (num_vocab, model_dim, ...); MHA, the MLP
    # 4 * model_dim wide, rotary on 8 of 16 dims.
    for t in ("phixtral", "phi-msft"):
        mg.TYPE_UNUSED_BASE_KEYS[t] = list(mg.BASE_CONFIG)
        mg.TYPE_DEFAULTS[t] = {"num_vocab": 256, "model_dim": 32, "num_heads": 4,
                               "num_layers": 2, "rotary_dim": 4, "num_experts_per_tok": 2,
                               "num_local_experts": 4}
    # phimoe: LayerNorms (eps rms_norm_eps), biased q/k/v/o and head;
    # 4 experts top-2 by sparsemixer; plain rope (rope_scaling null).
    mg.TYPE_DEFAULTS["phimoe"] = {"num_local_experts": 4, "num_experts_per_tok": 2,
                                  "intermediate_size": 32, "router_jitter_noise": 0.01,
                                  "rope_scaling": None}
    # longcat_flash: MLA (q 16 + 8 rope per head, latent 16, v 16, q rank 16,
    # both lora scales on); 3 experts + 2 identity experts, top-2, router
    # bias, renormalised and scaled.
    mg.TYPE_UNUSED_BASE_KEYS["longcat_flash"] = ["num_hidden_layers", "num_key_value_heads",
                                                 "intermediate_size", "tie_word_embeddings"]
    mg.TYPE_UNUSED_BASE_KEYS["longcat_flash_ngram"] = mg.TYPE_UNUSED_BASE_KEYS["longcat_flash"]
    mg.TYPE_DEFAULTS["longcat_flash"] = {
        "num_layers": 2, "attention_method": "MLA", "zero_expert_type": "identity",
        "ffn_hidden_size": 32, "moe_topk": 2, "expert_ffn_hidden_size": 16,
        "n_routed_experts": 3, "zero_expert_num": 2, "kv_lora_rank": 16, "q_lora_rank": 16,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "routed_scaling_factor": 1.5, "mla_scale_q_lora": True, "mla_scale_kv_lora": True,
        "attention_bias": False, "norm_topk_prob": True, "router_bias": True,
    }
    mg.TYPE_DEFAULTS["longcat_flash_ngram"] = mg.TYPE_DEFAULTS["longcat_flash"]
    # nemotron_h: layers M (Mamba-2: 4 heads of 16, state 16, 2 groups), *
    # (NoPE attention, 4 heads of 16, 2 KV heads), - (relu² MLP 64 wide), E
    # (4 plain relu² experts of 32 in 2 groups, 1 kept, top-2, renormalised
    # and scaled, a shared relu² expert of 32).
    nemotron_h_unused = ["num_hidden_layers", "rms_norm_eps", "rope_theta", "tie_word_embeddings"]
    mg.TYPE_UNUSED_BASE_KEYS["nemotron_h"] = nemotron_h_unused
    mg.TYPE_DEFAULTS["nemotron_h"] = {
        "intermediate_size": 64, "attention_bias": False, "mamba_num_heads": 4,
        "mamba_head_dim": 16, "mamba_proj_bias": False, "ssm_state_size": 16, "conv_kernel": 4,
        "n_groups": 2, "mlp_bias": False, "layer_norm_epsilon": 1e-5, "use_bias": False,
        "use_conv_bias": True, "hybrid_override_pattern": "M*-E", "moe_intermediate_size": 32,
        "moe_shared_expert_intermediate_size": 32, "n_group": 2, "n_routed_experts": 4,
        "n_shared_experts": 1, "topk_group": 1, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "routed_scaling_factor": 1.5, "time_step_limit": [0.0, 100.0],
    }
    # step3p5: layer 0 sliding (window 4, 2 heads of 16 / 1 KV head, rope on
    # half, theta 1e4), dense; layer 1 full (4 heads / 2 KV heads, theta
    # 5e5), MoE by moe_layers_enum; 4 experts of 32 top-2 + shared 32; the
    # SwiGLUs clamped at 0.5 (inside the values' range) but layer 1's experts.
    mg.TYPE_UNUSED_BASE_KEYS["step3p5"] = ["num_key_value_heads"]
    mg.TYPE_DEFAULTS["step3p5"] = {
        "num_attention_groups": 2, "head_dim": 16,
        "intermediate_size": 64, "rope_theta": [10000.0, 500000.0],
        "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
        "partial_rotary_factors": [0.5, 1.0],
        "attention_other_setting": {"num_attention_heads": 2, "num_attention_groups": 1},
        "use_head_wise_attn_gate": True, "moe_num_experts": 4, "moe_top_k": 2,
        "moe_intermediate_size": 32, "share_expert_dim": 32, "moe_layers_enum": " 1",
        "moe_router_scaling_factor": 1.5, "norm_expert_weight": True,
        "swiglu_limits": [0.0, None], "swiglu_limits_shared": [0.5, 0.5],
    }
    mg.CASES += [
        {"name": "step3p5", "model_type": "step3p5", "config": {}},
        # Clamped experts too; every other layer sliding by default (no
        # layer_types), MoE from layer 1 on (no moe_layers_enum), yarn on the
        # full layers only.
        {"name": "step3p5_clamped", "model_type": "step3p5",
         "config": {"swiglu_limits": [0.0, 0.5], "layer_types": None, "moe_layers_enum": None,
                    "rope_scaling": {"type": "yarn", "factor": 2.0,
                                     "original_max_position_embeddings": 256},
                    "yarn_only_types": ["full_attention"]}},
        {"name": "nemotron_h", "model_type": "nemotron_h", "config": {}},
        # The pattern as layers_block_type, MoE in a latent width of 32,
        # biased projections, head_dim given.
        {"name": "nemotron_h_latent", "model_type": "nemotron_h",
         "config": {"hybrid_override_pattern": None,
                    "layers_block_type": ["moe", "mamba", "attention"],
                    "moe_latent_size": 32, "mlp_bias": True, "mamba_proj_bias": True,
                    "attention_bias": True, "head_dim": 8}},
        {"name": "longcat_flash", "model_type": "longcat_flash", "config": {}, "seed": 1},
        # The same layers over n-gram hash embeddings: 2- and 3-grams, two
        # tables each (4 tables of 256 + 2t + 1 rows, 16 wide); the
        # prompt split and the greedy steps carry the last two ids over.
        {"name": "longcat_flash_ngram", "model_type": "longcat_flash_ngram", "seed": 1,
         "config": {"ngram_vocab_size_ratio": 1, "emb_neighbor_num": 3, "emb_split_num": 2}},
        {"name": "phixtral", "model_type": "phixtral", "config": {}, "seed": 2},
        # phi-msft (phixtral's alias) with one expert per token.
        {"name": "phi-msft", "model_type": "phi-msft", "config": {"num_experts_per_tok": 1},
         "seed": 5},
        {"name": "phimoe", "model_type": "phimoe", "config": {}, "seed": 1},
        # SuScaledRoPE: long factors and long_mscale (the short ones unused).
        {"name": "phimoe_longrope", "model_type": "phimoe",
         "config": {"original_max_position_embeddings": 128,
                    "rope_scaling": {"type": "longrope",
                                     "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                                     "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
                                     "short_mscale": 1.1, "long_mscale": 1.25}}},
    ]
    # nemotron_h's Mamba-2 convolution in Hugging Face's [C, 1, K] layout
    # (conv_hf is registered by recurrent.py, after this module).
    mg.CASES += [mg._derived("nemotron_h", "nemotron_h_hf", hf_layout="conv_hf")]
    # longcat_flash with per-expert tensors and kv_b_proj unsplit (the layout
    # is registered by recurrent.py).
    mg.CASES += [mg._derived("longcat_flash", "longcat_flash_hf", hf_layout="latent_moe_hf")]
    # As mlx_lm.convert quantizes it, one table per n-gram order (32 wide,
    # so that the tables and their projections quantize at group 32): the
    # hash tables looked up as quantized rows.
    mg.CASES += [mg._derived("longcat_flash_ngram", "longcat_flash_ngram_q4", {"emb_split_num": 1},
                             quantize={"bits": 4, "group_size": 32})]
    mg.HF_LAYOUTS["step3p5_vanilla"] = _step3p5_vanilla(mg)
    mg.CASES += [mg._derived("step3p5", "step3p5_vanilla", hf_layout="step3p5_vanilla")]
    # The config fuzzer's finding: step3p5 keeps its own lm_head whatever
    # tie_word_embeddings says.
    mg.CASES += [mg._derived("step3p5", "step3p5_tie_flag", {"tie_word_embeddings": True})]
    # Quantized: plain experts with biases (gather_qmm plus the expert's
    # bias row), and plain relu² experts with a quantized router.
    mg.CASES += [
        mg._derived("phixtral", "phixtral_q4", quantize={"bits": 4, "group_size": 32}, seed=0),
        mg._derived("nemotron_h", "nemotron_h_q4", quantize={"bits": 4, "group_size": 32},
                    seed=0),
    ]
    logits = next(k for k, row in enumerate(mg.TAPS) if row.module == "" and row.name == "logits")
    mg.TAPS[logits:logits] = _phixtral_taps(mg)
    # step3p5's mlp.gate returns (indices, weights), not logits.
    mg.NON_LINEAR_ROUTER_TYPES = mg.NON_LINEAR_ROUTER_TYPES | {"step3p5"}
    # Its attention names its head counts num_heads / num_kv_heads and gates
    # each head: not the llama math the generic checks redo.
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | {"step3p5"}
    _wrap_moe_reference(mg)
