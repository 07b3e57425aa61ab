"""Golden cases of the recurrent mixers of issue #23 (G4): mamba and
falcon_mamba (Mamba-1's selective scan), jamba (Mamba-1 / attention layers,
MoE every other layer)."""


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


def register(mg):
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
    k = next(k for k, row in enumerate(mg.TAPS) if row.module == "backbone.layers.{i}.mixer.norm")
    mg.TAPS[k:k] = _mamba_taps(mg)
