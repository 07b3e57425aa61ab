"""Golden cases of the VLM wrappers whose text model mlx-lm keeps alone:
gemma3, qwen2_vl / qwen2_5_vl, qwen3_vl, qwen3_vl_moe, pixtral, mistral3 /
llava, lfm2-vl, kimi_vl, kimi_k25. Each case builds the wrapper type itself
(the text model's keys under text_config, parameters under
language_model.*), and most are saved with vision-tower tensors (and, where
a Hugging Face checkpoint nests the text model differently, in that layout:
see the vlm_* HF_LAYOUTS below) that the wrapper's sanitize drops again, so
the spec's drop and rename rules are exercised."""

import dataclasses

import numpy as np

import mlx.core as mx

# Wrapper type -> the mlx-lm module of its text model (for the tap and block
# checks, which know the text families by their model_type).
TEXT_TYPE = {
    "gemma3": "gemma3_text", "qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3",
    "qwen3_vl_moe": "qwen3_moe", "pixtral": "llama", "mistral3": "llama", "llava": "llama",
    "lfm2-vl": "lfm2", "kimi_vl": "deepseek_v3", "kimi_k25": "deepseek_v3",
}
LM = "language_model."

# Vision-side tensors a checkpoint of each wrapper carries beside the text
# model (a few tiny ones under each top-level name its sanitize drops).
VISION = {
    "gemma3": ["vision_tower.vision_model.embeddings.patch_embedding.weight",
               "multi_modal_projector.mm_input_projection_weight"],
    "qwen2_vl": ["visual.patch_embed.proj.weight", "visual.merger.mlp.0.weight"],
    "qwen2_5_vl": ["model.visual.patch_embed.proj.weight", "model.visual.merger.mlp.0.bias"],
    "qwen3_vl": ["model.visual.patch_embed.proj.weight",
                 "model.visual.deepstack_merger_list.0.linear_fc1.weight"],
    "qwen3_vl_moe": ["visual.patch_embed.proj.weight", "visual.merger.linear_fc2.weight"],
    "pixtral": ["vision_tower.patch_conv.weight", "multi_modal_projector.linear_1.weight"],
    "mistral3": ["model.vision_tower.patch_conv.weight",
                 "model.multi_modal_projector.patch_merger.merging_layer.weight"],
    "llava": ["vision_tower.vision_model.embeddings.class_embedding",
              "multi_modal_projector.linear_2.bias"],
    "lfm2-vl": ["vision_tower.vision_model.embeddings.patch_embedding.weight",
                "multi_modal_projector.layer_norm.weight"],
    "kimi_vl": ["vision_tower.patch_embed.proj.weight", "multi_modal_projector.linear_1.weight",
                "language_model.model.layers.0.self_attn.rotary_emb.inv_freq"],
    "kimi_k25": ["vision_tower.patch_embed.proj.weight", "vision_model.encoder.norm.weight",
                 "mm_projector.proj.0.weight"],
}


def _vision(config):
    rng = np.random.RandomState(0)
    return {name: mx.array(rng.standard_normal((4, 8)).astype(np.float32))
            for name in VISION[config["model_type"]]}


def _mlx_with_vision(weights, config):
    """mlx-lm's names plus the vision tensors."""
    return dict(sorted({**weights, **_vision(config)}.items()))


def _hf_nested(weights, config):
    """Hugging Face's newer layout (transformers >= 4.52): the text model
    under model.language_model, the head at the top, towers under model."""
    out = {}
    for key, value in weights.items():
        if key.startswith(LM + "model."):
            key = "model.language_model." + key[len(LM + "model."):]
        elif key.startswith(LM):
            key = key[len(LM):]
        out[key] = value
    return dict(sorted({**out, **_vision(config)}.items()))


def _hf_flat(weights, config):
    """Hugging Face's older Qwen2-VL layout: the text model as a plain
    causal LM (model.*, lm_head) beside the visual tower."""
    out = {(k[len(LM):] if k.startswith(LM) else k): v for k, v in weights.items()}
    return dict(sorted({**out, **_vision(config)}.items()))


def _experts_with_vision(weights, config):
    """mlx-lm's names, but each MoE layer's stacked experts one per expert
    (as kimi checkpoints store them; sanitize stacks them), plus the vision
    tensors."""
    out = {}
    for key, value in weights.items():
        prefix, sep, rest = key.partition(".mlp.switch_mlp.")
        if not sep:
            out[key] = value
            continue
        proj, leaf = rest.split(".")
        for e in range(value.shape[0]):
            out[f"{prefix}.mlp.experts.{e}.{proj}.{leaf}"] = mx.contiguous(value[e])
    return dict(sorted({**out, **_vision(config)}.items()))


def _text(mg, **keys):
    """A text_config: the base text model config with these keys."""
    return {**mg.BASE_CONFIG, **keys}


DEEPSEEK_TEXT = {
    "model_type": "deepseek_v3", "num_hidden_layers": 3, "intermediate_size": 32,
    "num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16, "v_head_dim": 16, "attention_bias": False,
    "moe_intermediate_size": 8, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "routed_scaling_factor": 2.5, "topk_method": "noaux_tc",
    "scoring_func": "sigmoid", "norm_topk_prob": True, "n_group": 2, "topk_group": 1,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}


def _cases(mg):
    t = lambda **k: _text(mg, **k)  # noqa: E731
    return [
        # gemma3_text's case under text_config; the top-level vocab_size
        # wins over text_config's (mlx-lm copies it in); 4 layers, window 6
        # < prompt, layer 2 global with linear x8 rope; tied head (no
        # language_model.lm_head.weight).
        {"name": "gemma3", "model_type": "gemma3", "seed": 1, "config": {
            "vocab_size": 256,
            "text_config": t(model_type="gemma3_text", vocab_size=512, num_hidden_layers=4,
                             intermediate_size=32, head_dim=16, rms_norm_eps=1e-6,
                             sliding_window=6, sliding_window_pattern=3, rope_theta=1e6,
                             rope_local_base_freq=1e4, query_pre_attn_scalar=32,
                             rope_scaling={"rope_type": "linear", "factor": 8.0})},
         "drop_params": ["language_model.lm_head.weight"], "hf_layout": "vlm_mlx"},
        # Qwen2-VL's original layout: text keys at the top level (no
        # text_config), mrope rope_scaling (plain 1-D rope for text), q/k/v
        # biases, tied head; the text model saved as model.* / visual.*.
        {"name": "qwen2_vl", "model_type": "qwen2_vl", "seed": 0, "config": {
            **mg.BASE_CONFIG, "tie_word_embeddings": True, "rope_theta": 1e6,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
         "hf_layout": "vlm_hf_flat"},
        # Qwen2.5-VL as newer transformers write it: text_config, and the
        # text model under model.language_model, towers under model.visual;
        # untied.
        {"name": "qwen2_5_vl", "model_type": "qwen2_5_vl", "seed": 2, "config": {
            "text_config": t(model_type="qwen2_5_vl_text",
                             rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})},
         "hf_layout": "vlm_hf_nested"},
        # Qwen3-VL: qwen3 text (per-head q/k norms; head_dim 32 with 4 heads:
        # attention 128 wide, not hidden_size) in text_config with
        # interleaved mrope rope_scaling, HF nested layout, tied head.
        {"name": "qwen3_vl", "model_type": "qwen3_vl", "seed": 0, "config": {
            "text_config": t(model_type="qwen3_vl_text", head_dim=32, tie_word_embeddings=True,
                             rope_theta=5e5,
                             rope_scaling={"rope_type": "default", "mrope_interleaved": True,
                                           "mrope_section": [4, 6, 6]})},
         "hf_layout": "vlm_hf_nested"},
        # Qwen3-VL-MoE: layer 0 sparse (4 experts, top-2 renormalised),
        # layer 1 dense (mlp_only_layers); untied (its sanitize needs the
        # head); mlx names plus visual.*.
        {"name": "qwen3_vl_moe", "model_type": "qwen3_vl_moe", "seed": 1, "config": {
            "text_config": t(model_type="qwen3_vl_moe_text", head_dim=16, intermediate_size=32,
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True)},
         "hf_layout": "vlm_mlx"},
        # Pixtral: mistral text with head_dim 32 (attention 128 wide, not
        # hidden_size), rope_theta 1e6; head never tied.
        {"name": "pixtral", "model_type": "pixtral", "seed": 0, "config": {
            "text_config": t(model_type="mistral", head_dim=32, rope_theta=1e6,
                             intermediate_size=64)},
         "hf_layout": "vlm_mlx"},
        # Mistral3 with llama (mistral) text as HF nests it; layer 0 sliding
        # (window 3 < prompt), layer 1 full; tie_word_embeddings absent
        # (mlx-lm: untied).
        {"name": "mistral3", "model_type": "mistral3", "seed": 0, "config": {
            "text_config": {**{k: v for k, v in t(model_type="mistral").items()
                               if k != "tie_word_embeddings"},
                            "layer_types": ["sliding_attention", "full_attention"],
                            "sliding_window": 3}},
         "hf_layout": "vlm_hf_nested"},
        # LLaVA (alias of mistral3) with llama text, tied head, mlx names.
        {"name": "llava", "model_type": "llava", "seed": 0, "config": {
            "text_config": t(model_type="llama", tie_word_embeddings=True)},
         "hf_layout": "vlm_mlx"},
        # lfm2's case under text_config: conv layers 0, 1, 3, attention at
        # 2, feed-forward auto-adjusted 44 -> 32.
        {"name": "lfm2-vl", "model_type": "lfm2-vl", "seed": 0, "config": {
            "text_config": {**{k: v for k, v in t(model_type="lfm2").items()
                               if k not in ("rms_norm_eps", "tie_word_embeddings")},
                            "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3,
                            "block_dim": 64, "block_multiple_of": 8,
                            "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": True,
                            "rope_theta": 1e6, "num_hidden_layers": 4,
                            "layer_types": ["conv", "conv", "full_attention", "conv"],
                            "block_ff_dim": 44, "intermediate_size": 44}},
         "hf_layout": "vlm_mlx"},
        # deepseek_v3's case as Kimi-VL / Kimi-K2.5's text model: MLA,
        # layer 0 dense, 1-2 MoE (8 experts, V3 routing), experts stored
        # one per expert.
        {"name": "kimi_vl", "model_type": "kimi_vl", "seed": 1, "config": {
            "text_config": t(**DEEPSEEK_TEXT)}, "hf_layout": "vlm_experts"},
        {"name": "kimi_k25", "model_type": "kimi_k25", "seed": 1, "config": {
            "text_config": t(**DEEPSEEK_TEXT)}, "hf_layout": "vlm_experts"},
    ]


def _taps(mg):
    """The text model's rows under language_model.*, for the wrappers only."""
    rows = []
    for row in mg.TAPS:
        if not row.module.startswith("model."):
            continue
        inner = row.applies

        def applies(t, c, inner=inner):
            if t not in TEXT_TYPE:
                return False
            text = c.get("text_config", c)
            return inner is None or inner(TEXT_TYPE[t], text)

        rows.append(dataclasses.replace(row, module=LM + row.module, applies=applies))
    return rows


def _unwrap(model, model_type, config):
    if model_type in TEXT_TYPE and "language_model" in model:
        return model["language_model"], TEXT_TYPE[model_type], (config or {}).get(
            "text_config", config)
    return model, model_type, config


def _wrap_block_checks(mg):
    """The MoE / MLA / short-conv references and the routing statistics walk
    model.layers: run them on the wrapped text model, as its own type."""
    original_stats, original_math = mg.routing_stats, mg.check_block_math

    def routing_stats(model, model_type, config, taps):
        return original_stats(*_unwrap(model, model_type, config), taps)

    def check_block_math(model, model_type, config, taps, compare, have):
        return original_math(*_unwrap(model, model_type, config), taps, compare, have)

    mg.routing_stats = routing_stats
    mg.check_block_math = check_block_math


def register(mg):
    for t in TEXT_TYPE:
        mg.TYPE_UNUSED_BASE_KEYS[t] = list(mg.BASE_CONFIG)
        mg.FUZZ_FIXED_DIMS.add(t)
    mg.HF_LAYOUTS.update({
        "vlm_mlx": (_mlx_with_vision, {"format": "mlx"}),
        "vlm_hf_nested": (_hf_nested, {"format": "pt"}),
        "vlm_hf_flat": (_hf_flat, {"format": "pt"}),
        "vlm_experts": (_experts_with_vision, {"format": "mlx"}),
    })
    mg.CASES += _cases(mg)
    mg.CASES += [
        # A checkpoint with its own head keeps it (gemma3_text ties only a
        # missing one).
        mg._derived("gemma3", "gemma3_untied", drop_params=None),
        # As mlx_lm.convert quantizes it: the text model's quant_predicate
        # makes the routers 8-bit / group 64, recorded per module under
        # language_model.model.layers.{i}.mlp.gate.
        mg._derived("qwen3_vl_moe", "qwen3_vl_moe_q4", quantize={"bits": 4, "group_size": 32}),
    ]
    # Rows other case modules added for their own language_model.* models
    # (without an `applies`) stay off the wrappers here.
    theirs = lambda t, c: t not in TEXT_TYPE  # noqa: E731
    mg.TAPS[:] = [dataclasses.replace(r, applies=theirs)
                  if r.module.startswith(LM) and r.applies is None else r for r in mg.TAPS]
    rows = _taps(mg)
    logits = next(k for k, row in enumerate(mg.TAPS) if row.module == "" and row.name == "logits")
    mg.TAPS[logits:logits] = rows
    _wrap_block_checks(mg)
