"""Golden cases of cross-layer dataflow: nanbeige (the layer stack looped
with shared weights), hunyuan (cross-layer attention: layers reuse an
earlier layer's keys and values), talkie (a model-level value, the
normalised embedding, added in every block), afm7 (layers that attend over
another layer's keys and values, through its cache), iquestloopcoder (a
second pass over the layers that mixes attention over the first pass's
keys and values with its own windowed attention).

Registered last (file-name order): a looped stack calls each mlx-lm layer
module more than once, so per-layer taps, which bind one call of one
module, are turned off for these types; the logits and the cached path
are what the cases check.
"""

# Types whose layer stack is not one pass of llama's layers.
OWN_LAYOUT = {"nanbeige", "hunyuan", "talkie", "afm7", "iquestloopcoder", "gemma4_text",
              "gemma4", "gemma4_unified", "gemma3n"}

TYPE_DEFAULTS = {
    "nanbeige": {"head_dim": 16},
    "talkie": {"head_dim": 16, "rms_norm_eps": 1e-6},
    "iquestloopcoder": {"head_dim": 16, "loop_num": 2, "loop_window_size": 4},
    "gemma4_text": {"hidden_size": 32, "head_dim": 16, "global_head_dim": 32, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "num_hidden_layers": 6, "sliding_window_pattern": 3,
                    "sliding_window": 4, "num_kv_shared_layers": 2,
                    "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 256,
                    "intermediate_size": 32, "final_logit_softcapping": 30.0},
    "afm7": {"hidden_dim": 64, "num_layers": 3, "num_kv_reuse_layers": 1, "num_heads": 4,
             "num_kv_heads": 2, "hidden_dim_scale_factor": 1.0},
    "hunyuan": {"attention_bias": False, "moe_topk": 2, "num_experts": 4,
                "num_shared_expert": 1, "use_mixed_mlp_moe": True, "use_qk_norm": True,
                "use_cla": True, "cla_share_factor": 2, "moe_intermediate_size": 32,
                "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
                "tie_word_embeddings": True},
}

CASES = [
    # Two loops over two layers: four layer calls, four caches, the final
    # norm between the loops and at the end.
    {"name": "nanbeige", "model_type": "nanbeige", "config": {"num_loops": 2}, "seed": 1},
    # Three loops given as per-loop loss weights, no norm between loops.
    {"name": "nanbeige_loss_weights", "model_type": "nanbeige",
     "config": {"loop_loss_weights": [0.5, 0.5], "skip_loop_final_norm": True}, "seed": 1},
    # Layer 0 projects keys and values, layer 1 reuses them; softmax top-2
    # of 4 experts beside a shared MLP.
    {"name": "hunyuan", "model_type": "hunyuan", "config": {"intermediate_size": 32}},
    # Three layers sharing one projection (factor 3), per-layer lists of
    # top-k, shared-MLP multiples and expert widths.
    {"name": "hunyuan_lists", "model_type": "hunyuan",
     "config": {"num_hidden_layers": 3, "cla_share_factor": 3, "moe_topk": [1, 2, 3],
                "intermediate_size": 16,
                "num_shared_expert": [1, 2, 1], "moe_intermediate_size": [32, 16, 48]}},
    # Weightless norms, reversed rope, per-head and scalar gains, the
    # embedding skip in both blocks, a gained head.
    {"name": "talkie", "model_type": "talkie", "config": {}, "seed": 1},
    # Two regular layers and one that reuses layer 1's keys and values;
    # keys and values fake-quantized to 8 bits with learned scales.
    {"name": "afm7", "model_type": "afm7", "config": {}},
    # Two layers run twice; the second pass's local window (4) is shorter
    # than the prompt, its gates mix in the first pass's keys and values.
    {"name": "iquestloopcoder", "model_type": "iquestloopcoder", "config": {}},
    # Six layers (full attention at 2 and 5, sliding window 4 elsewhere);
    # layers 4 and 5 attend over layers 3's and 2's keys and values;
    # per-layer inputs of 8; full layers with head width 32 and a quarter of
    # it rotated (proportional rope).
    {"name": "gemma4_text", "model_type": "gemma4_text", "config": {}},
    # Keys as values on full layers with their own head count.
    {"name": "gemma4_text_k_eq_v", "model_type": "gemma4_text",
     "config": {"attention_k_eq_v": True, "num_global_key_value_heads": 2,
                "hidden_size_per_layer_input": 0}, "seed": 0},
    # No cross-layer attention and one expert: a dense MLP per layer.
    {"name": "hunyuan_dense", "model_type": "hunyuan",
     "config": {"use_cla": False, "num_experts": 1, "use_mixed_mlp_moe": False}, "seed": 1},
]


# gemma4's towers, which its sanitize drops (a few tiny tensors each).
GEMMA4_TOWERS = ["model.vision_tower.patch_embedder.weight", "model.embed_vision.proj.weight",
                 "model.audio_tower.conv.weight", "model.embed_audio.proj.weight",
                 "model.vision_embedder.norm.weight"]


def gemma4_to_hf(weights, config):
    """Hugging Face's layout of gemma4: the text model under
    model.language_model, the towers beside it."""
    import numpy as np
    import mlx.core as mx
    rng = np.random.RandomState(0)
    out = {}
    for key, value in weights.items():
        if key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model."):]
        out[key] = value
    for name in GEMMA4_TOWERS:
        out[name] = mx.array(rng.standard_normal((4, 8)).astype(np.float32))
    return dict(sorted(out.items()))


def _fix_mlx_lm_gemma3n():
    """mlx-lm's gemma3n shares keys and values only through a cache: called
    without one, its KV-shared layers compute their own from the
    projections they keep (which generation never uses). The generator
    gives every call a fresh cache, so that the references follow the
    shared keys and values as generation does."""
    from mlx_lm.models import gemma3n

    call = gemma3n.Model.__call__

    def with_cache(self, inputs, cache=None, input_embeddings=None):
        if cache is None:
            cache = self.make_cache()
        return call(self, inputs, cache=cache, input_embeddings=input_embeddings)

    gemma3n.Model.__call__ = with_cache


def register(mg):
    _fix_mlx_lm_gemma3n()
    mg.TYPE_DEFAULTS.update(TYPE_DEFAULTS)
    mg.CASES += CASES
    # gemma4: gemma4_text's case under text_config, saved in Hugging Face's
    # layout with tower tensors beside it.
    mg.TYPE_UNUSED_BASE_KEYS["gemma4"] = list(mg.BASE_CONFIG)
    mg.HF_LAYOUTS["gemma4"] = (gemma4_to_hf, {"format": "pt"})
    text = {**mg.BASE_CONFIG, **TYPE_DEFAULTS["gemma4_text"], "model_type": "gemma4_text"}
    mg.CASES.append({"name": "gemma4", "model_type": "gemma4", "seed": 0, "hf_layout": "gemma4",
                     "config": {"vocab_size": 256, "text_config": text}})
    # The encoder-free variant, which mlx-lm maps to gemma4.
    mg.TYPE_UNUSED_BASE_KEYS["gemma4_unified"] = list(mg.BASE_CONFIG)
    mg.CASES.append({"name": "gemma4_unified", "model_type": "gemma4_unified", "seed": 0,
                     "hf_layout": "gemma4", "config": {"vocab_size": 256, "text_config": text}})
    # gemma3n: 4 AltUp streams of 32; layers sliding, full, sliding, then
    # two KV-shared ones (sliding: layer 2's keys, full: layer 1's);
    # activation sparsity on the first two layers; per-layer MLP widths; a
    # per-layer table of 200 rows for a vocabulary of 256 (ids past it look
    # up row 0). The window (12) is the prompt's length: mlx-lm's KV-shared
    # sliding layers read their source's rotating cache, which a longer
    # prefill has already cut to the window (its cached and uncached
    # logits then differ); the greedy continuation runs past it.
    mg.TYPE_UNUSED_BASE_KEYS["gemma3n"] = list(mg.BASE_CONFIG)
    g3n = {
        "model_type": "gemma3n_text", "hidden_size": 32, "num_hidden_layers": 5,
        "intermediate_size": [32, 48, 32, 32, 32], "num_attention_heads": 4, "head_dim": 16,
        "rms_norm_eps": 1e-6, "vocab_size": 256, "num_key_value_heads": 2,
        "num_kv_shared_layers": 2, "vocab_size_per_layer_input": 200, "sliding_window": 12,
        "max_position_embeddings": 512, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
        "final_logit_softcapping": 30.0,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                        "sliding_attention", "full_attention"],
        "activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0, 0.0],
        "hidden_size_per_layer_input": 8, "altup_num_inputs": 4, "altup_coef_clip": 120.0,
        "altup_correct_scale": True, "altup_active_idx": 0, "laurel_rank": 8,
    }
    mg.CASES.append({"name": "gemma3n", "model_type": "gemma3n", "seed": 0,
                     "config": {"text_config": g3n}})
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | OWN_LAYOUT

    def one_pass_only(row):
        before = row.applies

        def applies(model_type, config):
            if model_type in OWN_LAYOUT:
                return False
            return before is None or before(model_type, config)

        # In place: other modules' conditions compare rows by identity.
        object.__setattr__(row, "applies", applies)

    for row in mg.TAPS:
        if "{i}" in row.module:
            one_pass_only(row)
