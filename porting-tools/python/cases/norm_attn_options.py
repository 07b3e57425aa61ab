"""Golden cases of issue 23's norm/activation/rope and attention options:
nemotron, nanochat, ... (one family module; see README.md)."""
import dataclasses

import numpy as np

import mlx.core as mx

# Types whose layer is not llama's with llama's module names meaning llama's
# things (checked by the generic tap checks instead of the llama ones).
OWN_LAYOUT = {"phi3small", "nemotron", "nanochat", "llama4_text", "apertus", "dbrx", "ministral3", "plamo",
              "mimo_v2_flash", "laguna", "muse_glimmer", "gear", "gpt_oss", "mistral4",
              "plamo2"}

TYPE_DEFAULTS = {
    "nemotron": {"norm_eps": 1e-5, "hidden_act": "relu2", "partial_rotary_factor": 0.5},
    # nanochat's ModelArgs has defaults for everything; the base keys it reads.
    "nanochat": {"num_key_value_heads": 4},
    "llama4_text": {"head_dim": 16, "intermediate_size_mlp": 96, "use_qk_norm": True,
                    "no_rope_layers": [1, 0]},
    "dbrx": {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256,
             "attn_config": {"kv_n_heads": 2, "clip_qkv": 1.0, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}},
    "ministral3": {"head_dim": 16, "tie_word_embeddings": False,
                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 4,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                       "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}},
    "plamo": {"n_shared_head": 2, "rope_traditional": False},
    "mimo_v2_flash": {
        "hybrid_layer_pattern": [1, 0], "moe_layer_freq": [0, 1], "sliding_window_size": 4,
        "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": True,
        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
        "swa_v_head_dim": 8, "swa_rope_theta": 10000.0,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 24, "v_head_dim": 16,
        "rope_theta": 1000000.0, "partial_rotary_factor": 0.5, "attention_value_scale": 0.7,
        "layernorm_epsilon": 1e-5, "intermediate_size": 64, "moe_intermediate_size": 16,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
        "routed_scaling_factor": 2.0, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "norm_topk_prob": True, "n_group": 2, "topk_group": 1},
    "laguna": {
        "head_dim": 16, "intermediate_size": 64, "qkv_bias": True, "attention_bias": True,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4,
        "num_attention_heads_per_layer": [4, 2],
        "rope_parameters": {
            "sliding_attention": {"rope_theta": 10000.0},
            "full_attention": {"rope_theta": 1000000.0, "partial_rotary_factor": 0.5,
                               "rope_type": "yarn", "factor": 4.0,
                               "original_max_position_embeddings": 16}},
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24, "moe_routed_scaling_factor": 2.0},
    "muse_glimmer": {"head_dim": 16, "post_norm_eps": 1e-6, "sliding_window": 4,
                     "qk_scale_factor": 2.0, "output_multiplier": 0.5,
                     "final_logit_softcapping": 5.0, "hidden_activation": "silu"},
    "gear": {"head_dim": 16, "intermediate_size": 32, "sliding_window": 4, "conv_L_cache": 3,
             "attention_bias": True, "query_pre_attn_scalar": 24,
             "attn_logit_softcapping": 5.0, "final_logit_softcapping": 6.0,
             "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
             "rope_scaling": {"rope_type": "linear", "factor": 2.0},
             "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    "gpt_oss": {"head_dim": 16, "intermediate_size": 32, "num_local_experts": 4,
                "num_experts_per_tok": 2, "sliding_window": 4,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                 "beta_slow": 1.0, "original_max_position_embeddings": 16}},
    "mistral4": {
        "num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16, "v_head_dim": 16, "intermediate_size": 32,
        "moe_intermediate_size": 16, "n_routed_experts": 4, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "routed_scaling_factor": 2.0, "norm_topk_prob": True,
        "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 4, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "llama_4_scaling_beta": 0.5}},
    "plamo2": {"hidden_size_per_head": 16, "mamba_num_heads": 4, "mamba_d_state": 16,
               "mamba_d_conv": 4, "mamba_step": 2, "intermediate_size": 64,
               "tie_word_embeddings": True},
    "apertus": {"mlp_bias": True, "attention_bias": False, "post_norm": False, "qk_norm": True},
}

TYPE_UNUSED_BASE_KEYS = {
    "nemotron": ["rms_norm_eps"],
    "nanochat": ["rms_norm_eps", "tie_word_embeddings"],
    "dbrx": None,  # set in register: every BASE_CONFIG key
    "ministral3": ["rope_theta"],
    "mimo_v2_flash": ["rms_norm_eps", "tie_word_embeddings"],
    "laguna": ["rope_theta"],
    "gpt_oss": ["max_position_embeddings", "tie_word_embeddings"],
    "mistral4": ["rope_theta"],
    "plamo2": ["rope_theta"],
    "muse_glimmer": ["max_position_embeddings"],
    "plamo": ["num_key_value_heads", "max_position_embeddings", "tie_word_embeddings"],
}

# The base text keys Llama 4's text_config carries (no tie: its head is
# never tied).
BASE_TEXT = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "max_position_embeddings": 512}

CASES = [
    # Phi-3-small: layer 0 block-sparse (blocks of 32: each query sees its
    # own block, and block 0 from block 1 only in heads 1 and 3, stride 2),
    # layer 1 dense; grouped query_key_value (2 query heads per key/value
    # head); GeGELU clamped at 0.5; muP scales (embedding x10, logits / 8,
    # attention 1 / head_dim; the multipliers 0.5 and 2, not 10 and 8: with
    # a tied head and random weights, a large embedding repeats its token
    # greedily). The 44 positions of the prompt and greedy
    # steps reach block 1. mlx-lm's Model writes -inf at fixed token ids up
    # to 100351, past this vocabulary (MLX's scatter crashes there), so the
    # generator keeps the ids inside it: none at 256. Its block-sparse
    # layers do not hide later keys of a query's own block (a boolean mask
    # added to the scores) and place a multi-token call's queries in blocks
    # by the keys' count rounded up, not by their positions: the generator
    # fixes both (docs/coverage.md).
    {"name": "phi3small", "model_type": "phi3small", "seed": 0, "config": {
        "dense_attention_every_n_layers": 2, "ff_intermediate_size": 64, "gegelu_limit": 0.5,
        "layer_norm_epsilon": 1e-5, "rope_embedding_base": 10000.0,
        "blocksparse_block_size": 32, "blocksparse_num_local_blocks": 1,
        "blocksparse_vert_stride": 2, "mup_width_multiplier": 2.0,
        "mup_embedding_multiplier": 0.5}},
    # Llama 4's text model under text_config, 4 layers: 0-2 with an
    # interleaved llama3-scaled rope, weightless q/k norms after it and
    # attention within aligned chunks of 5 positions (the 44 positions of
    # the prompt and greedy steps cross eight chunk borders); layer 3 over
    # every position, no rope, the query temperature with floor_scale 4.
    # Layers 1 and 3 are top-1 mixtures of 4 experts (the sigmoid score
    # scaling the input) plus a shared expert; 0 and 2 dense, 48 wide.
    {"name": "llama4", "model_type": "llama4", "seed": 0, "config": {"text_config": {
        **BASE_TEXT,
        "model_type": "llama4_text", "num_hidden_layers": 4, "head_dim": 16,
        "intermediate_size": 16, "intermediate_size_mlp": 48, "attention_bias": False,
        "attention_chunk_size": 5, "interleave_moe_layer_step": 2, "num_experts_per_tok": 1,
        "num_local_experts": 4, "use_qk_norm": True, "attn_temperature_tuning": 4,
        "floor_scale": 4, "attn_scale": 0.1,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}}},
    # LayerNorm1P ((1 + w) scale, bias) everywhere, relu² MLP, rope on half
    # of each head with linear scaling.
    {"name": "nemotron", "model_type": "nemotron",
     "config": {"rope_scaling": {"type": "linear", "factor": 2.0}}},
    # Weightless RMS norms (embedding, both branches, q/k after the rope,
    # final), rope with negated frequencies, relu² MLP, logits capped at 15.
    {"name": "nanochat", "model_type": "nanochat", "config": {}},
    # Weightless q/k norms, interleaved rope in layer 0, none in layer 1
    # (no_rope_layers [1, 0]), MLP intermediate_size_mlp (96) wide, untied
    # head "output".
    {"name": "llama4_text", "model_type": "llama4_text", "config": {}, "seed": 1},
    # xIELU MLP (its four scalars drawn at random too), per-head q/k norms.
    {"name": "apertus", "model_type": "apertus", "config": {}},
    # The same model with the xIELU scalars alpha_p / alpha_n stored [1], as
    # Hugging Face does (mlx-lm squeezes them).
    {"name": "apertus_hf", "model_type": "apertus", "config": {}, "hf_layout": "apertus"},
    # Wqkv clamped to ±1 (about 40% of its outputs clipped), top-2 of 4
    # experts by a float32 softmax, renormalised.
    {"name": "dbrx", "model_type": "dbrx", "config": {}},
    # The same model with Hugging Face's fused experts (w1, v1, w2 [4 * 32, 64]).
    {"name": "dbrx_hf", "model_type": "dbrx", "config": {}, "hf_layout": "dbrx"},
    # The llama-4 query temperature with period 4: 1 + 0.5 ln(1 + floor(p / 4))
    # grows from 1 to ~2.2 over positions 0..43 (at Ministral 3's own period,
    # 16384, a short prompt would never see it); yarn over the same 4
    # positions; layer 0 slides over 5 positions, layer 1 is full.
    {"name": "ministral3", "model_type": "ministral3",
     "config": {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 5}},
    # 4 query heads over ceil(4 / 2) = 2 key/value heads, tiled: query
    # heads 0 and 2 read head 0, 1 and 3 head 1 (grouped GQA would pair 0, 1).
    {"name": "plamo", "model_type": "plamo", "config": {}},
    # Layer 0 sliding (window 4, 4 heads over 2, keys 16 and values 8 wide,
    # rope on 8, base 1e4) with a dense MLP; layer 1 full (2 heads over 1,
    # keys 24 and values 16 wide, rope on 12, base 1e6) with 4 sigmoid-routed
    # experts in 2 groups plus a shared one. Learned sinks in both, values
    # scaled by 0.7.
    {"name": "mimo_v2_flash", "model_type": "mimo_v2_flash", "config": {}},
    # Layer 0: sliding (window 4), 4 query heads, full rope base 1e4, dense
    # MLP; layer 1: full, 2 query heads, yarn on half of each head, 4
    # sigmoid-routed experts (top 2, renormalised, x2) plus a shared one.
    # Softplus output gates per head, q/k/v/o biases.
    {"name": "laguna", "model_type": "laguna", "config": {}},
    # The default layer pattern: layers 0-2 local (window 4, rope), layer 3
    # global (NoPE); logits x0.5 then capped at 5.
    {"name": "muse_glimmer", "model_type": "muse_glimmer",
     "config": {"num_hidden_layers": 4, "intermediate_size": 32, "hidden_size": 48}, "seed": 1},
    # Layer 0 sliding attention (window 4, local rope base), layer 1 the
    # gated convolution mixer (kernel 3, biases, 2 key/value heads repeated
    # to 4), layer 2 full attention (linear rope scaling); scores capped at
    # 5, logits at 6; tied head.
    {"name": "gear", "model_type": "gear",
     "config": {"num_hidden_layers": 3,
                "layer_types": ["sliding_attention", "conv_mixer", "full_attention"]}},
    # The same model as Hugging Face stores it: Conv1d weights [C, 1, K],
    # rotary inv_freq buffers, the tied lm_head written out.
    {"name": "gear_hf", "model_type": "gear",
     "config": {"num_hidden_layers": 3,
                "layer_types": ["sliding_attention", "conv_mixer", "full_attention"]},
     "hf_layout": "gear"},
    # Layer 0 sliding (window 4), layer 1 full, both with learned sinks and
    # q/k/v/o biases; yarn over 16 positions; 4 experts with biases, top 2 by
    # a softmax over their router logits (router bias). gpt-oss's SwiGLU
    # clamps at 7, which these small random weights never reach.
    {"name": "gpt_oss", "model_type": "gpt_oss", "config": {}},
    # Latent attention with yarn over 4 positions and the llama-4 query
    # temperature of period 4 on the whole query; layer 0 dense, layer 1 with
    # 4 softmax-routed experts in 2 groups (the best group's top 2,
    # renormalised, x2) plus a shared one.
    {"name": "mistral4", "model_type": "mistral4", "config": {}},
    # Layer 0 Mamba-2 (4 heads of 16, state 16, conv 4), layer 1 attention
    # (mamba_step 2) with learned [heads, head_dim] gains after the
    # weightless q/k norms; tied head.
    {"name": "plamo2", "model_type": "plamo2", "config": {}},
    # The same model with the convolution as Hugging Face stores it, [C, 1, K].
    {"name": "plamo2_hf", "model_type": "plamo2", "config": {}, "hf_layout": "plamo2"},
    # Mistral3 whose text model is ministral3 (the ministral3 case's config
    # under text_config, the head untied as mlx-lm makes it), saved with
    # vision tensors under mlx-lm's names (vlm_text.py's vlm_mlx layout).
    {"name": "mistral3_ministral3", "model_type": "mistral3", "config": {"text_config": {
        "model_type": "ministral3", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 128, "vocab_size": 256, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 5,
        "rope_parameters": TYPE_DEFAULTS["ministral3"]["rope_parameters"]}},
     "hf_layout": "vlm_mlx"},
    # Mistral3 whose text model is mistral4 (the mistral4 case's config under
    # text_config), saved as Hugging Face nests it (model.language_model.*,
    # vision tensors under model.*: vlm_text.py's vlm_hf_nested layout).
    {"name": "mistral3_mistral4", "model_type": "mistral3", "config": {"text_config": {
        "model_type": "mistral4", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 256, "max_position_embeddings": 512,
        **TYPE_DEFAULTS["mistral4"]}},
     "hf_layout": "vlm_hf_nested"},
]


def register(mg):
    mg.TYPE_DEFAULTS.update(TYPE_DEFAULTS)
    mg.HF_LAYOUTS["gear"] = (gear_to_hf, {"format": "pt"})
    mg.HF_LAYOUTS["plamo2"] = (plamo2_to_hf, {"format": "pt"})
    mg.HF_LAYOUTS["apertus"] = (apertus_to_hf, {"format": "pt"})
    mg.HF_LAYOUTS["dbrx"] = (dbrx_to_hf, {"format": "pt"})
    mg.HF_LAYOUTS["llama4"] = (llama4_to_hf, {"format": "pt"})
    mg.TYPE_UNUSED_BASE_KEYS.update(TYPE_UNUSED_BASE_KEYS)
    mg.TYPE_UNUSED_BASE_KEYS["dbrx"] = list(mg.BASE_CONFIG)
    mg.TYPE_UNUSED_BASE_KEYS["phi3small"] = ["rms_norm_eps", "rope_theta",
                                             "max_position_embeddings", "tie_word_embeddings",
                                             "intermediate_size"]
    _fix_mlx_lm_phi3small()
    # mlx-lm's llama4 reads the cache of layer 3 whatever the layer count:
    # the fuzzer keeps the case's 4 layers (and its other sizes).
    mg.FUZZ_FIXED_DIMS.add("llama4")
    # Llama 4's top level holds model_type and text_config alone.
    mg.TYPE_UNUSED_BASE_KEYS["llama4"] = list(mg.BASE_CONFIG)
    mg.CASES += CASES
    # Llama 4 as Hugging Face stores it: fused expert projections
    # (gate_up_proj [4, 64, 2 * 16], down_proj [4, 16, 64]) and vision
    # tensors beside the text model.
    mg.CASES.append(mg._derived("llama4", "llama4_hf", hf_layout="llama4"))
    # As mlx_lm.convert quantizes it: 4-bit / group 32 everywhere (the
    # experts through gather_qmm).
    mg.CASES.append(mg._derived("llama4", "llama4_q4", quantize={"bits": 4, "group_size": 32}))
    # As mlx_lm.convert quantizes it: 4-bit / group 32 everywhere (the
    # experts with gather_qmm, their biases dense), the router 8-bit / 64 by
    # the model's quant_predicate; norms and sinks stay float32.
    mg.CASES.append(mg._derived("gpt_oss", "gpt_oss_q4", quantize={"bits": 4, "group_size": 32}))
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | OWN_LAYOUT
    # Sandwich norms: post_attention_layernorm normalises the attention output.
    mg.POST_NORM_TYPES = mg.POST_NORM_TYPES | {"muse_glimmer", "gear"}
    # MoE gates returning (indices, weights): no router tap.
    mg.NON_LINEAR_ROUTER_TYPES = mg.NON_LINEAR_ROUTER_TYPES | {"mimo_v2_flash", "laguna", "muse_glimmer", "gear", "gpt_oss"}
    # mimo_v2_flash routes as deepseek_v3 (noaux_tc) does.
    moe_reference = mg.moe_reference

    def moe_reference_(block, model_type, config, x):
        as_type = "deepseek_v3" if model_type == "mimo_v2_flash" else model_type
        return moe_reference(block, as_type, config, x)

    mg.moe_reference = moe_reference_
    # nanochat: transformer.wte / transformer.h.{i}.attn.c_proj, mlp.c_proj.
    # Its norms are functions, not modules: the projections reading them
    # (c_q, c_k, c_v, c_fc) have no input tap to be checked against.
    rows = [
        mg.Tap("transformer.wte", "embed"),
        mg.Tap("transformer.h.{i}.attn.c_proj", "layers.{i}.attn.o"),
        mg.Tap("transformer.h.{i}.attn", "layers.{i}.attn"),
        mg.Tap("transformer.h.{i}", "layers.{i}.h", residual="attn"),
        mg.Tap("transformer.h.{i}.mlp.c_proj", "layers.{i}.mlp.down"),
        mg.Tap("transformer.h.{i}.mlp", "layers.{i}.mlp"),
        mg.Tap("transformer.h.{i}", "layers.{i}"),
    ]
    # llama4_text: the MLP under feed_forward.
    rows += [
        mg.Tap("model.layers.{i}.feed_forward.gate_proj", "layers.{i}.mlp.gate"),
        mg.Tap("model.layers.{i}.feed_forward.up_proj", "layers.{i}.mlp.up"),
        mg.Tap("model.layers.{i}.feed_forward.down_proj", "layers.{i}.mlp.down"),
    ]
    # apertus: its own norm names.
    rows += [
        mg.Tap("model.layers.{i}.attention_layernorm", "layers.{i}.attn_norm"),
        mg.Tap("model.layers.{i}.feedforward_layernorm", "layers.{i}.mlp_norm"),
    ]
    # dbrx: transformer.blocks.{i}.norm_attn_norm.{norm_1, attn, norm_2}, ffn.
    rows += [
        mg.Tap("transformer.blocks.{i}.norm_attn_norm.norm_1", "layers.{i}.attn_norm"),
        mg.Tap("transformer.blocks.{i}.norm_attn_norm.attn.Wqkv", "layers.{i}.attn.qkv",
               detail=True),
        mg.Tap("transformer.blocks.{i}.norm_attn_norm.attn.out_proj", "layers.{i}.attn.o"),
        mg.Tap("transformer.blocks.{i}.norm_attn_norm.attn", "layers.{i}.attn"),
        mg.Tap("transformer.blocks.{i}.norm_attn_norm.norm_2", "layers.{i}.mlp_norm"),
        mg.Tap("transformer.blocks.{i}.ffn.router.layer", "layers.{i}.mlp.router"),
        mg.Tap("transformer.blocks.{i}.ffn", "layers.{i}.mlp"),
        mg.Tap("transformer.blocks.{i}", "layers.{i}"),
        mg.Tap("transformer.norm_f", "norm"),
    ]
    # plamo: model.layers.layers.{i}, one norm for both branches.
    rows += [
        mg.Tap("model.layers.layers.{i}.norm", "layers.{i}.attn_norm"),
        mg.Tap("model.layers.layers.{i}.self_attn.q_proj", "layers.{i}.attn.q", detail=True),
        mg.Tap("model.layers.layers.{i}.self_attn.k_proj", "layers.{i}.attn.k", detail=True),
        mg.Tap("model.layers.layers.{i}.self_attn.v_proj", "layers.{i}.attn.v", detail=True),
        mg.Tap("model.layers.layers.{i}.self_attn.rotary_emb", "layers.{i}.attn.q_rope", call=0,
               detail=True),
        mg.Tap("model.layers.layers.{i}.self_attn.rotary_emb", "layers.{i}.attn.k_rope", call=1,
               detail=True),
        mg.Tap("model.layers.layers.{i}.self_attn.o_proj", "layers.{i}.attn.o"),
        mg.Tap("model.layers.layers.{i}.self_attn", "layers.{i}.attn"),
        mg.Tap("model.layers.layers.{i}.mlp.gate_proj", "layers.{i}.mlp.gate"),
        mg.Tap("model.layers.layers.{i}.mlp.up_proj", "layers.{i}.mlp.up"),
        # (mlp.down_proj, mlp and the layer output: plamo3's rows, dense_b.py)
    ]
    # laguna's router (gate.proj, always renormalised, scaled after the sum)
    # and mistral4's (softmax with group limits) have no reference in
    # make_golden: their MoE outputs are checked end to end.
    _skip_layer_walks(mg, {"plamo", "plamo2", "laguna", "mistral4"})
    at = len(mg.TAPS) - 1  # before the logits row
    mg.TAPS[at:at] = [dataclasses.replace(row, applies=_only(OWN_LAYOUT)) for row in rows]


def gear_to_hf(weights, config):
    """What mlx-lm's gear sanitize turns back: depthwise conv weights as
    [C, 1, K], rotary inv_freq buffers of the attention layers, and
    lm_head.weight although tied."""
    out = {}
    for k, v in weights.items():
        if k.endswith(("key_conv.weight", "value_conv.weight")):
            v = v.transpose(0, 2, 1)
        out[k] = v
    half = config["head_dim"] // 2
    for i, kind in enumerate(config["layer_types"]):
        if kind != "conv_mixer":
            out[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = mx.ones((half,))
    out["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return dict(sorted(out.items()))


def dbrx_to_hf(weights, config):
    """What mlx-lm's dbrx sanitize splits: each layer's experts as
    experts.mlp.{w1, v1, w2} [experts * ffn, hidden] (w2's blocks
    transposed)."""
    n = config["ffn_config"]["moe_num_experts"]
    out = {k: v for k, v in weights.items() if ".ffn.experts." not in k}
    for i in range(config["n_layers"]):
        prefix = f"transformer.blocks.{i}.ffn.experts"
        for w in ("w1", "v1", "w2"):
            parts = [weights[f"{prefix}.{e}.{w}.weight"] for e in range(n)]
            if w == "w2":
                parts = [p.T for p in parts]
            out[f"{prefix}.mlp.{w}"] = mx.concatenate(parts, axis=0)
    return dict(sorted(out.items()))


def _fix_mlx_lm_phi3small():
    """Two fixes to mlx-lm 0.32.2's phi3small. It sets fixed token ids (up
    to 100351) to -inf; with a smaller vocabulary MLX's scatter writes out
    of bounds: keep the ids inside the model's vocabulary. And its masks
    in the block-sparse layers (below)."""
    from mlx_lm.models import phi3small

    init = phi3small.Model.__init__

    def patched(self, args):
        init(self, args)
        ids = [i for i in self._dummy_tokenizer_ids.tolist() if i < args.vocab_size]
        self._dummy_tokenizer_ids = mx.array(ids, dtype=mx.int32)

    phi3small.Model.__init__ = patched

    # Its block-sparse layers add the causal mask to the scores, but
    # create_attention_mask gives a boolean mask: allowed keys get +1,
    # later keys of the query's own block +0, so they are not hidden (and a
    # prompt in two calls gives other logits than whole). The mask as the
    # additive 0 / -inf it stands for:
    sparse = phi3small.Attention._block_sparse_attention

    def additive(self, queries, keys, values, scale, mask):
        if mask is not None and mask.dtype == mx.bool_:
            mask = mx.where(mask, mx.array(0.0, queries.dtype), mx.array(-mx.inf, queries.dtype))
        return sparse(self, queries, keys, values, scale, mask)

    phi3small.Attention._block_sparse_attention = additive

    # And its dense mask places a call's queries in blocks counted from the
    # end of the keys rounded up to a whole block: when the keys do not
    # fill their last block, queries of a multi-token call land in later
    # blocks than their positions' (rows with no key at all, NaN, once a
    # prompt is longer than a block). The mask by the positions themselves:
    def by_positions(self, q_len, kv_len):
        bs, local = self.blocksparse_block_size, self.blocksparse_num_local_blocks
        q_block = (mx.arange(kv_len - q_len, kv_len) // bs)[None, :, None]
        k_block = (mx.arange(kv_len) // bs)[None, None, :]
        heads = mx.arange(1, self.n_heads + 1)[:, None, None]
        vertical = (k_block + heads) % self.blocksparse_vert_stride == 0
        dense = (q_block >= k_block) & ((q_block - k_block < local) | vertical)
        return None, dense.reshape(self.n_kv_heads, self.n_q_per_kv, q_len, kv_len)

    phi3small.Attention._block_sparse_mask = by_positions


def llama4_to_hf(weights, config):
    """What mlx-lm's llama4 sanitize splits and transposes: each MoE layer's
    experts as experts.gate_up_proj [E, D, 2F] and experts.down_proj
    [E, F, D]; plus tensors of the vision tower and projector it drops."""
    out = {}
    for key, value in weights.items():
        prefix, sep, rest = key.partition(".feed_forward.experts.")
        if not sep:
            out[key] = value
        elif rest == "gate_proj.weight":
            up = weights[f"{prefix}.feed_forward.experts.up_proj.weight"]
            out[f"{prefix}.feed_forward.experts.gate_up_proj"] = mx.concatenate(
                [mx.swapaxes(value, 1, 2), mx.swapaxes(up, 1, 2)], axis=-1)
        elif rest == "down_proj.weight":
            out[f"{prefix}.feed_forward.experts.down_proj"] = mx.contiguous(
                mx.swapaxes(value, 1, 2))
    rng = np.random.RandomState(0)
    for name in ("vision_model.patch_embedding.linear.weight",
                 "multi_modal_projector.linear_1.weight"):
        out[name] = mx.array(rng.standard_normal((4, 8)).astype(np.float32))
    return dict(sorted(out.items()))


def apertus_to_hf(weights, config):
    """What mlx-lm's apertus sanitize squeezes: alpha_p / alpha_n as [1]."""
    return {k: (v.reshape(1) if k.endswith(("alpha_p", "alpha_n")) else v)
            for k, v in sorted(weights.items())}


def plamo2_to_hf(weights, config):
    """What mlx-lm's plamo2 sanitize turns back: conv1d weights [C, 1, K]."""
    return {k: (v.transpose(0, 2, 1) if k.endswith("conv1d.weight") else v)
            for k, v in sorted(weights.items())}


def _skip_layer_walks(mg, types):
    """Leaves `types` out of routing_stats / check_block_math (which walk
    model.layers as a list; plamo's is a module holding the list)."""
    routing_stats, check_block_math = mg.routing_stats, mg.check_block_math

    # A VLM wrapper's text model reaches here as vlm_text.py unwraps it: as
    # the wrapper's text family, with its own config (and model_type).
    def skipped(model_type, config):
        return model_type in types or (config or {}).get("model_type") in types

    def routing_stats_(model, model_type, config, taps):
        if skipped(model_type, config):
            return {}
        return routing_stats(model, model_type, config, taps)

    def check_block_math_(model, model_type, config, taps, compare, have):
        if not skipped(model_type, config):
            check_block_math(model, model_type, config, taps, compare, have)

    mg.routing_stats, mg.check_block_math = routing_stats_, check_block_math_


def _only(types):
    def check(model_type, config):
        return model_type in types
    return check
