"""Golden cases of the moe_a group: mellum, deepseek, dots1, glm4_moe,
glm4_moe_lite, youtu_llm, minicpm3, Klear (issue #18)."""
import numpy as np

# Latent attention as deepseek_v3's case: q 16 (no rope) + 8 (rope) per head,
# latent kv 32, q bottleneck 32; num_key_value_heads is read but unused.
_MLA = {"num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 32,
        "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "attention_bias": False}
# DeepSeek-V3 routing: 8 experts in 2 groups (1 kept), top-2 of the sigmoid
# scores + correction bias, renormalised, x 2.5, one shared expert.
_V3_MOE = {"n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
           "n_shared_experts": 1, "routed_scaling_factor": 2.5, "n_group": 2,
           "topk_group": 1, "norm_topk_prob": True, "first_k_dense_replace": 1}

# Types whose MoE is recomputed by moe_reference below, and how it routes.
_ROUTES_AS = {"mellum": "qwen3_moe", "deepseek": "qwen2_moe", "dots1": "deepseek_v3",
              "glm4_moe": "deepseek_v3", "glm4_moe_lite": "deepseek_v3"}


def _wrap_moe_reference(mg):
    """dots1 and Klear keep their stacked experts under mlp.experts (not
    switch_mlp); Klear routes by sigmoid + expert_bias and mixes routed and
    shared experts by softmax(coefficient(x)); the others route as an
    existing type (_ROUTES_AS)."""
    original_moe, original_is_moe = mg.moe_reference, mg._is_moe

    def is_moe(block):
        return original_is_moe(block) or type(block).__name__ in ("Dots1MoE", "KlearSparseMoeBlock")

    def view(block):
        out = {"gate": block["gate"], "switch_mlp": block.get("switch_mlp", block.get("experts"))}
        if "shared_experts" in block:
            out["shared_experts"] = block["shared_experts"]
        return out

    def moe_reference(block, model_type, config, x):
        if model_type in _ROUTES_AS:
            return original_moe(view(block), _ROUTES_AS[model_type], config, x)
        if model_type != "Klear":
            return original_moe(block, model_type, config, x)
        k = config["num_experts_per_tok"]
        scores = mg._sigmoid(mg._apply_linear(block["gate"], x))
        plain, _ = mg._topk(scores, k)
        inds, margin = mg._topk(scores + mg._f64(block["expert_bias"]), k)
        weights = np.take_along_axis(scores, inds, axis=-1)
        if config.get("norm_topk_prob"):
            weights = weights / weights.sum(axis=-1, keepdims=True)
        sw = block["experts"]
        wg, wu, wd = (mg._dense(sw[n]) for n in ("gate_proj", "up_proj", "down_proj"))
        hidden = mg._silu(np.einsum("btd,eid->btei", x, wg)) * np.einsum("btd,eid->btei", x, wu)
        experts = np.einsum("btei,edi->bted", hidden, wd)
        routed = (np.take_along_axis(experts, inds[..., None], axis=2) * weights[..., None]).sum(2)
        coef = mg._softmax(mg._apply_linear(block["coefficient"], x))
        y = routed * coef[..., :1] + mg._glu_mlp(block["shared_experts"], x) * coef[..., 1:]
        differs = int(np.sum(np.any(np.sort(plain, -1) != np.sort(inds, -1), axis=-1)))
        return y, {"experts": inds, "margin": margin, "differs_without_bias": differs}

    mg.moe_reference = moe_reference
    mg._is_moe = is_moe


def _per_expert_hf(mg):
    """Hugging Face's per-expert layout for MoE layers whose stacked experts
    live under mlp.switch_mlp (deepseek) or mlp.experts (dots1, Klear): each
    [E, out, in] weight becomes E tensors mlp.experts.{e}.{proj}.weight, as
    the models' sanitize stacks them back."""
    def convert(weights, config):
        out = {}
        for key, value in weights.items():
            for stacked in (".mlp.switch_mlp.", ".mlp.experts."):
                prefix, sep, rest = key.partition(stacked)
                if sep and value.ndim == 3:
                    for e in range(value.shape[0]):
                        out[f"{prefix}.mlp.experts.{e}.{rest}"] = mg.mx.contiguous(value[e])
                    break
            else:
                out[key] = value
        return dict(sorted(out.items()))
    return convert, {"format": "pt"}


def register(mg):
    register_sparse_attention(mg)
    # Keys of BASE_CONFIG these types do not read.
    mg.TYPE_UNUSED_BASE_KEYS.update({
        "deepseek": ["tie_word_embeddings"],
        "Klear": ["tie_word_embeddings"],
        "mellum": ["rope_theta"],
    })
    mg.TYPE_DEFAULTS.update({
        "deepseek": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "n_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                     "intermediate_size": 32, "attention_bias": False},
        # Every layer MoE; intermediate_size is required but unused.
        "mellum": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 32, "norm_topk_prob": True,
                   "tie_word_embeddings": True, "sliding_window": 4,
                   "layer_types": ["sliding_attention", "full_attention"],
                   "rope_parameters": {
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "yarn", "rope_theta": 1000000.0,
                                          "factor": 4.0, "original_max_position_embeddings": 64},
                   }},
        "dots1": {**_V3_MOE, "head_dim": 16, "intermediate_size": 64, "attention_bias": False,
                  "mlp_bias": False},
        "glm4_moe": {**_V3_MOE, "head_dim": 16, "partial_rotary_factor": 0.5, "use_qk_norm": True,
                     "attention_bias": True, "rope_scaling": None, "intermediate_size": 64},
        "glm4_moe_lite": {**_MLA, **_V3_MOE, "v_head_dim": 16, "intermediate_size": 64},
        "youtu_llm": {**_MLA, "v_head_dim": 16, "rope_traditional": True,
                      "tie_word_embeddings": True, "mlp_bias": False},
        # v_head_dim is hidden_size / heads (16).
        "minicpm3": {**_MLA, "scale_depth": 1.4, "scale_emb": 12.0, "dim_model_base": 32,
                     "rope_scaling": {"type": "longrope", "original_max_position_embeddings": 16,
                                      "short_factor": [1.0, 1.0, 1.0, 1.0],
                                      "long_factor": [1.0, 1.5, 2.0, 3.0]}},
        "Klear": {"attention_bias": False, "mlp_only_layers": [], "num_experts": 4,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 1, "n_shared_experts": 1,
                  "moe_intermediate_size": 32, "norm_topk_prob": True, "intermediate_size": 64},
    })
    mg.CASES += [
        # 3 layers: 0 dense (first_k_dense_replace 1), 1 dense (moe_layer_freq
        # 2), 2 MoE (softmax top-2 of 4, not renormalised, + shared expert);
        # q/k/v/o biases; linear rope scaling x2.
        {"name": "deepseek", "model_type": "deepseek",
         "config": {"num_hidden_layers": 3, "moe_layer_freq": 2, "attention_bias": True,
                    "rope_scaling": {"type": "linear", "factor": 2.0}}, "seed": 2},
        # Layer 0 sliding (window 4 < prompt) with rope_theta 1e4, layer 1
        # full with yarn over rope_theta 1e6 (per-layer rope_parameters);
        # per-head q/k norms; softmax top-2 of 4 renormalised; tied head.
        {"name": "mellum", "model_type": "mellum", "config": {}, "seed": 5},
        # Per-head q/k norms; layer 0 dense, layer 1 V3-routed MoE (experts
        # under mlp.experts); biases on the dense MLP and the shared expert
        # (mlp_bias).
        {"name": "dots1", "model_type": "dots1", "config": {"mlp_bias": True}, "seed": 0},
        # q/k/v biases (no o bias), per-head q/k norms, rope on half of each
        # head; layer 0 dense, layer 1 V3-routed MoE.
        {"name": "glm4_moe", "model_type": "glm4_moe", "config": {}, "seed": 0},
        # deepseek_v3 latent attention whose q_a / kv_a norms use rms_norm_eps
        # (0.05 here), yarn with mscale_all_dim; layer 0 dense, layer 1 MoE.
        {"name": "glm4_moe_lite", "model_type": "glm4_moe_lite",
         "config": {"rms_norm_eps": 0.05,
                    "rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 1.0,
                                     "mscale_all_dim": 1.0,
                                     "original_max_position_embeddings": 64}}, "seed": 0},
        # Latent attention with an unsplit kv_b_proj, q_a / kv_a norms at
        # rms_norm_eps (0.05), llama3 rope scaling, interleaved rope; dense
        # MLP; tied head.
        {"name": "youtu_llm", "model_type": "youtu_llm",
         "config": {"rms_norm_eps": 0.05,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}}, "seed": 2},
        # Latent attention (q/kv_a/o biases), longrope (long factors, mscale
        # from 512 / 16), embedding x 12, branches x 1.4 / sqrt(2), logits /
        # (64 / 32) (untied).
        {"name": "minicpm3", "model_type": "minicpm3", "config": {"attention_bias": True},
         "seed": 0},
        # q/k/v/o biases, per-head q/k norms; layer 0 dense (mlp_only_layers),
        # layer 1: sigmoid top-2 of 4 with expert_bias, renormalised, mixed
        # with the shared expert by softmax(coefficient(x)).
        {"name": "Klear", "model_type": "Klear",
         "config": {"attention_bias": True, "mlp_only_layers": [0]}, "seed": 1},
    ]
    mg.HF_LAYOUTS["per_expert"] = _per_expert_hf(mg)
    # The same models in Hugging Face's per-expert layout (stack rules).
    mg.CASES += [mg._derived(t, f"{t}_hf", hf_layout="per_expert")
                 for t in ("deepseek", "dots1", "Klear")]
    # Routers that are not a Linear (MoEGate returns (indices, weights)).
    mg.NON_LINEAR_ROUTER_TYPES = mg.NON_LINEAR_ROUTER_TYPES | {
        "deepseek", "dots1", "glm4_moe", "glm4_moe_lite"}
    # Scaled residual branches: no layers.{i}.h tap.
    mg.SCALED_RESIDUAL_TYPES = mg.SCALED_RESIDUAL_TYPES | {"minicpm3"}
    # Latent attention, or attention modules without n_heads: the generic
    # tap checks instead of the llama ones.
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | {
        "deepseek", "Klear", "youtu_llm", "minicpm3", "glm4_moe_lite"}
    # Klear's mixing weights softmax(coefficient(x)), [B, T, 2].
    at = next(k for k, t in enumerate(mg.TAPS) if t.module == "model.layers.{i}.mlp.shared_experts")
    mg.TAPS.insert(at + 1, mg.Tap("model.layers.{i}.mlp.coefficient", "layers.{i}.mlp.coef"))
    _wrap_moe_reference(mg)


def register_sparse_attention(mg):
    """DeepSeek-V3.2's sparse attention (deepseek_v32, glm_moe_dsa): the
    deepseek_v3 case with a lightning indexer of 4 heads of 16 (its first 8
    features roped) keeping 5 keys per query, so that every query past the
    fifth position attends to 5 of its keys. Routing as deepseek_v3's."""
    indexer = {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 5}
    mg.TYPE_DEFAULTS["deepseek_v32"] = {**mg.TYPE_DEFAULTS["deepseek_v3"], **indexer,
                                        "indexer_rope_interleave": False}
    # glm_moe_dsa: rope_theta inside rope_parameters, the indexer's rope on
    # interleaved pairs (its default).
    mg.TYPE_UNUSED_BASE_KEYS["glm_moe_dsa"] = ["rope_theta"]
    mg.TYPE_DEFAULTS["glm_moe_dsa"] = {
        **mg.TYPE_DEFAULTS["deepseek_v3"], **indexer, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    for t in ("deepseek_v32", "glm_moe_dsa"):
        _ROUTES_AS[t] = "deepseek_v3"
    mg.NON_LINEAR_ROUTER_TYPES = mg.NON_LINEAR_ROUTER_TYPES | {"deepseek_v32", "glm_moe_dsa"}
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | {"deepseek_v32", "glm_moe_dsa"}
    mg.CASES += [
        mg._derived("deepseek_v3", "deepseek_v32", model_type="deepseek_v32"),
        mg._derived("deepseek_v3", "glm_moe_dsa", model_type="glm_moe_dsa"),
    ]
