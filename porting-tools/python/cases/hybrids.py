"""Golden cases of the hybrid families: qwen3_5 / qwen3_5_moe (Gated
DeltaNet + gated attention, as qwen3_next with unfused DeltaNet projections),
falcon_h1 (parallel Mamba-2 + attention) and granitemoehybrid (Mamba-2 or
attention layers by layer_types, MoE + shared MLP, granite multipliers)."""

import numpy as np

Q35 = "language_model.model"
PRISM = "prism_hadamard_qwen35"


def _only(*types):
    return lambda model_type, config: model_type in types


def _qwen3_5_moe(model_type, config):
    return (model_type in ("qwen3_5", "qwen3_5_moe")
            and bool(config.get("text_config", config).get("num_experts")))


def _qwen3_5_taps(mg):
    """qwen3_5 nests the text model under language_model: its own rows."""
    L = f"{Q35}.layers.{{i}}"

    def T(*args, applies=_only("qwen3_5", "qwen3_5_moe", PRISM), **kw):
        return mg.Tap(*args, applies=applies, **kw)
    return [
        T(f"{Q35}.embed_tokens", "embed"),
        T(f"{L}.input_layernorm", "layers.{i}.attn_norm"),
        T(f"{L}.self_attn.q_proj", "layers.{i}.attn.q", detail=True),  # [q | gate] per head
        T(f"{L}.self_attn.q_proj", "layers.{i}.attn.qg", detail=True),  # the engine's name
        T(f"{L}.self_attn.k_proj", "layers.{i}.attn.k", detail=True),
        T(f"{L}.self_attn.v_proj", "layers.{i}.attn.v", detail=True),
        T(f"{L}.self_attn.q_norm", "layers.{i}.attn.q_norm", transform="transpose_heads",
          detail=True),
        T(f"{L}.self_attn.k_norm", "layers.{i}.attn.k_norm", transform="transpose_heads",
          detail=True),
        T(f"{L}.self_attn.rope", "layers.{i}.attn.q_rope", call=0, detail=True),
        T(f"{L}.self_attn.rope", "layers.{i}.attn.k_rope", call=1, detail=True),
        T(f"{L}.self_attn.o_proj", "layers.{i}.attn.o"),
        T(f"{L}.self_attn.o_proj", "layers.{i}.attn"),
        # Gated DeltaNet: [q | k | v] (all heads of each), z, b, a unfused;
        # "conv" = conv1d over [q | k | v] before its silu.
        T(f"{L}.linear_attn.in_proj_qkv", "layers.{i}.attn.qkv", detail=True),
        T(f"{L}.linear_attn.in_proj_z", "layers.{i}.attn.z", detail=True),
        T(f"{L}.linear_attn.in_proj_b", "layers.{i}.attn.b", detail=True),
        T(f"{L}.linear_attn.in_proj_a", "layers.{i}.attn.a", detail=True),
        T(f"{L}.linear_attn.conv1d", "layers.{i}.attn.conv", detail=True),
        T(f"{L}.linear_attn.out_proj", "layers.{i}.attn.o"),
        T(f"{L}.linear_attn", "layers.{i}.attn"),
        T(L, "layers.{i}.h", residual="self_attn"),
        T(L, "layers.{i}.h", residual="linear_attn"),
        T(f"{L}.post_attention_layernorm", "layers.{i}.mlp_norm"),
        T(f"{L}.mlp.gate_proj", "layers.{i}.mlp.gate"),
        T(f"{L}.mlp.up_proj", "layers.{i}.mlp.up"),
        T(f"{L}.mlp.gate", "layers.{i}.mlp.router"),
        # The engine's MoE node is "moe" (its shared expert "moe.shared",
        # the gate logit "moe.shared_gate"); "mlp" kept for the tap checks.
        T(f"{L}.mlp.shared_expert", "layers.{i}.moe.shared"),
        T(f"{L}.mlp.shared_expert_gate", "layers.{i}.moe.shared_gate"),
        T(f"{L}.mlp.down_proj", "layers.{i}.mlp.down"),
        T(f"{L}.mlp", "layers.{i}.mlp"),
        T(f"{L}.mlp", "layers.{i}.moe", applies=_qwen3_5_moe),
        T(L, "layers.{i}"),
        T(f"{Q35}.norm", "norm"),
    ]


def _wrap_routing_stats(mg):
    """routing_stats knows model.layers only: qwen3_5's MoE layers live under
    language_model.model.layers and route as qwen3_next's (softmax top-k,
    renormalised, sigmoid-gated shared expert); granitemoehybrid's
    block_sparse_moe routes as mixtral's (softmax over the top-k logits)
    with its router under router.layer."""
    original_stats, original_moe = mg.routing_stats, mg.moe_reference

    def moe_reference(block, model_type, config, x):
        if model_type == "granitemoehybrid":
            k = config["num_experts_per_tok"]
            logits = mg._apply_linear(block["router"]["layer"], x)
            inds, margin = mg._topk(logits, k)
            weights = mg._softmax(np.take_along_axis(logits, inds, axis=-1))
            sw = block["switch_mlp"]
            wg, wu, wd = (mg._dense(sw[n]) for n in ("gate_proj", "up_proj", "down_proj"))
            hidden = (mg._silu(np.einsum("btd,eid->btei", x, wg))
                      * np.einsum("btd,eid->btei", x, wu))
            experts = np.einsum("btei,edi->bted", hidden, wd)
            chosen = np.take_along_axis(experts, inds[..., None], axis=2)
            return (chosen * weights[..., None]).sum(axis=2), {"experts": inds, "margin": margin}
        return original_moe(block, model_type, config, x)

    def routing_stats(model, model_type, config, taps):
        if model_type not in ("qwen3_5", "qwen3_5_moe"):
            return original_stats(model, model_type, config, taps)
        text = config.get("text_config", config)
        stats = {}
        for i, layer in enumerate(mg.walk(model, f"{Q35}.layers") or []):
            block = layer.get("mlp")
            if mg._is_moe(block) and f"layers.{i}.mlp_norm" in taps:
                _, stats[i] = original_moe(block, "qwen3_next", text,
                                           taps[f"layers.{i}.mlp_norm"].astype(np.float64))
        return stats

    mg.moe_reference = moe_reference
    mg.routing_stats = routing_stats


def _falcon_h1_taps(mg):
    """falcon_h1: the mamba mixer before self_attn (granitemoehybrid's
    instead of it), then pre_ff_layernorm and feed_forward (the engine's
    mlp_norm / mlp)."""
    L = "model.layers.{i}"

    def T(*args, types=("falcon_h1", "granitemoehybrid"), **kw):
        return mg.Tap(*args, applies=_only(*types), **kw)

    mamba = [
        # in_proj = [gate | x B C (conv input) | dt]; "conv" = conv1d output
        # before its silu.
        T(f"{L}.mamba.in_proj", "layers.{i}.mamba.proj", detail=True),
        T(f"{L}.mamba.conv1d", "layers.{i}.mamba.conv", detail=True),
        T(f"{L}.mamba.out_proj", "layers.{i}.mamba.o"),
        T(f"{L}.mamba", "layers.{i}.mamba"),
    ]
    mlp = [
        T(f"{L}.pre_ff_layernorm", "layers.{i}.mlp_norm", types=("falcon_h1",)),
        T(f"{L}.feed_forward.gate_proj", "layers.{i}.mlp.gate", types=("falcon_h1",)),
        T(f"{L}.feed_forward.up_proj", "layers.{i}.mlp.up", types=("falcon_h1",)),
        T(f"{L}.feed_forward.down_proj", "layers.{i}.mlp.down", types=("falcon_h1",)),
    ]
    return mamba, mlp


def _granitemoehybrid_taps(mg):
    """granitemoehybrid's MoE: "moe" the routed experts (block_sparse_moe,
    also mixtral's "mlp" row), "shared_mlp" the shared SwiGLU MLP."""
    L = "model.layers.{i}"

    def T(*args):
        return mg.Tap(*args, applies=_only("granitemoehybrid"))

    return [
        T(f"{L}.block_sparse_moe", "layers.{i}.moe"),
        T(f"{L}.shared_mlp.input_linear", "layers.{i}.shared_mlp.gate_up"),
        T(f"{L}.shared_mlp.output_linear", "layers.{i}.shared_mlp.down"),
        T(f"{L}.shared_mlp", "layers.{i}.shared_mlp"),
    ]


def _hadamard_matrix(block):
    """MLX's normalised Walsh-Hadamard transform of size `block`, as a
    float64 matrix (the transform of the identity's rows; symmetric)."""
    import mlx.core as mx
    eye = mx.eye(block, dtype=mx.float32)
    return np.array(mx.hadamard_transform(eye, scale=1 / np.sqrt(block))).astype(np.float64)


def _fix_for_hadamard_packs(mg):
    """Random weights for mlx-lm's Hadamard packs (prism_hadamard_qwen35):
    the packed modules' 2-bit words drawn at random, scales and biases in
    float16 (as the packs store them) spread like the float weights, signs
    +1 or -1. And the reference math of the tap checks (`_dense`) with a
    rotated module's rotation folded into its weight: y = W H (s * x), so
    each row w becomes s * (H w) blockwise (H symmetric)."""
    from mlx_lm.models import prism_hadamard_qwen35 as prism

    randomize, dense = mg.randomize_parameters, mg._dense

    def randomize_packs(model, seed):
        randomize(model, seed)
        packed = [m for _, m in model.named_modules()
                  if isinstance(m, prism.HadamardQuantizedLinear)]
        if not packed:
            return
        mx = mg.mx
        mx.random.seed(seed + 1)
        for m in packed:
            lo, hi = (mx.random.randint(0, 1 << 16, m.weight.shape).astype(mx.uint32)
                      for _ in range(2))
            m.weight = lo + (hi << 16)
            scale = mg.WEIGHT_STD * (0.6 + 0.1 * mx.random.normal(m.scales.shape))
            m.scales = scale.astype(mx.float16)
            shift = -1.5 * scale + 0.1 * mg.WEIGHT_STD * mx.random.normal(m.scales.shape)
            m.biases = shift.astype(mx.float16)
            if m.block:
                m.signs = mx.where(mx.random.normal(m.signs.shape) > 0, 1.0, -1.0)
        mx.eval(model.parameters())

    def dense_rotated(module):
        w = dense(module)
        block = getattr(module, "block", 0)
        if not block:
            return w
        rows, width = w.shape
        h = _hadamard_matrix(block)
        folded = (w.reshape(rows, width // block, block) @ h).reshape(rows, width)
        return folded * np.array(module["signs"]).astype(np.float64)

    mg.randomize_parameters = randomize_packs
    mg._dense = dense_rotated


def register_hadamard_packs(mg):
    _fix_for_hadamard_packs(mg)
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | {PRISM}
    # The text model's keys under text_config (mlx-lm reads the pack's own
    # keys from the top level only when text_config is there).
    mg.TYPE_UNUSED_BASE_KEYS[PRISM] = list(mg.BASE_CONFIG)
    L = "model.layers"
    # 512 wide (a rotation block of 512 needs it): a DeltaNet layer, then
    # attention (mlx-lm's qwen3_5 needs one). Packed with a rotation of 512:
    # the tied embedding and head, and every projection that reads the
    # hidden state; packed without one (block 0): the projections of
    # narrower inputs (128 wide: 4 value heads and 4 attention heads of 32).
    rotated = [f"{L}.0.linear_attn.in_proj_qkv", f"{L}.0.linear_attn.in_proj_z",
               f"{L}.0.linear_attn.in_proj_b", f"{L}.0.linear_attn.in_proj_a",
               f"{L}.1.self_attn.q_proj", f"{L}.1.self_attn.k_proj",
               f"{L}.1.self_attn.v_proj"]
    rotated += [f"{L}.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")]
    plain = [f"{L}.0.linear_attn.out_proj", f"{L}.1.self_attn.o_proj",
             f"{L}.0.mlp.down_proj", f"{L}.1.mlp.down_proj"]
    record = {"embedding": False, "dtype": "float16"}
    modules = ([{**record, "path": "model.embed_tokens", "block": 512, "embedding": True}]
               + [{**record, "path": p, "block": 512} for p in rotated]
               + [{**record, "path": p, "block": 0} for p in plain])
    mg.TYPE_DEFAULTS[PRISM] = {
        "text_config": {
            **mg.BASE_CONFIG, **mg.TYPE_DEFAULTS["qwen3_5"], "model_type": "qwen3_5_text",
            "hidden_size": 512, "intermediate_size": 128, "num_hidden_layers": 2,
            "head_dim": 32, "linear_value_head_dim": 32, "tie_word_embeddings": True,
            "rms_norm_eps": 1e-6,
        },
        "schema_version": 2, "tensor_namespace": "mlx-vlm-qwen3_5",
        "gdn_activation_layout": "grouped",
        "quantization": {"bits": 2, "group_size": 128, "mode": "affine"},
        "modules": modules,
    }
    mg.CASES += [{"name": "prism_hadamard_qwen35", "model_type": PRISM, "config": {},
                  "seed": 0}]


def _insert_before(mg, module, rows):
    k = next(k for k, row in enumerate(mg.TAPS) if row.module == module)
    mg.TAPS[k:k] = rows


def register(mg):
    mg.TYPE_DEFAULTS.update({
        # 2 DeltaNet key heads of 16, 4 value heads of 16; attention every
        # 2nd layer; rope_parameters as Qwen3.5's configs write them.
        "qwen3_5": {"head_dim": 16, "full_attention_interval": 2,
                    "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                    "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                    "linear_conv_kernel_dim": 4,
                    "rope_parameters": {"mrope_interleaved": True, "mrope_section": [2, 1, 1],
                                        "rope_type": "default", "rope_theta": 10000.0,
                                        "partial_rotary_factor": 0.5}},
    })
    # qwen3_5_moe: the text model's keys under text_config, as Qwen3.5-MoE's
    # configs (the top level has model_type and text_config only).
    mg.TYPE_UNUSED_BASE_KEYS["qwen3_5_moe"] = list(mg.BASE_CONFIG)
    mg.TYPE_DEFAULTS["qwen3_5_moe"] = {
        "text_config": {
            **mg.BASE_CONFIG, **mg.TYPE_DEFAULTS["qwen3_5"],
            "model_type": "qwen3_5_moe_text", "tie_word_embeddings": True,
            "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 32, "norm_topk_prob": True,
            "rms_norm_eps": 1e-6,
        },
    }
    # falcon_h1: 4 mamba heads of 16 (mixer 64 wide), state 16, 2 groups;
    # attention 4 heads of 16 (2 KV heads). The multipliers of the muP
    # folding are read by sanitize only (HF checkpoints); the tied head's
    # lm_head_multiplier / embedding_multiplier is 0.5 here (Falcon-H1's
    # ~0.007 would squeeze the greedy margins below MIN_GREEDY_MARGIN).
    mg.TYPE_DEFAULTS["falcon_h1"] = {
        "head_dim": 16, "intermediate_size": 64, "mamba_n_heads": 4, "mamba_d_head": 16,
        "mamba_d_ssm": 64, "mamba_d_state": 16, "mamba_n_groups": 2, "mamba_d_conv": 4,
        "mamba_expand": 1, "mamba_conv_bias": True, "mamba_proj_bias": False,
        "projectors_bias": False, "mamba_rms_norm": False, "mamba_norm_before_gate": False,
        "attention_bias": False, "mlp_bias": False, "rope_traditional": False,
        "embedding_multiplier": 2.0, "lm_head_multiplier": 1.0, "tie_word_embeddings": True,
    }
    # granitemoehybrid: a Mamba-2 layer (4 heads of 16, state 16, 2 groups,
    # dt clipped at both ends) and an attention layer; MoE of 4 experts
    # (top-2, softmax over the chosen logits) + a shared MLP on both; the
    # granite multipliers away from 1 and from head_dim ** -0.5.
    mg.TYPE_DEFAULTS["granitemoehybrid"] = {
        "attention_bias": False, "embedding_multiplier": 2.0, "attention_multiplier": 0.2,
        "logits_scaling": 2.0, "residual_multiplier": 0.5,
        "layer_types": ["mamba", "attention"], "intermediate_size": 16,
        "num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 32,
        "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_n_groups": 2,
        "mamba_d_conv": 4, "mamba_proj_bias": False, "mamba_conv_bias": True,
        "position_embedding_type": "rope", "time_step_limit": [0.005, 1.0],
        "tie_word_embeddings": True,
    }
    mg.CASES += [
        {"name": "granitemoehybrid", "model_type": "granitemoehybrid", "config": {}, "seed": 2},
        # Dense (no experts): SwiGLU MLPs; attention first, without rope
        # (position_embedding_type nope); mamba and MLP biases on; untied.
        {"name": "granitemoehybrid_dense", "model_type": "granitemoehybrid",
         "config": {"num_local_experts": None, "num_experts_per_tok": None,
                    "shared_intermediate_size": None, "intermediate_size": 64,
                    "layer_types": ["attention", "mamba"], "position_embedding_type": "nope",
                    "mamba_proj_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
         "seed": 0},
        # Plain gate (silu(gate) * y, as Falcon-H1's configs), every bias on,
        # tied head scaled by 0.5.
        {"name": "falcon_h1", "model_type": "falcon_h1",
         "config": {"mamba_proj_bias": True, "projectors_bias": True, "attention_bias": True,
                    "mlp_bias": True}, "seed": 1},
        # The gated RMS norm: norm(silu(gate) * y) (untied head), and
        # silu(gate) * norm(y) (norm before the gate).
        {"name": "falcon_h1_rms_norm", "model_type": "falcon_h1",
         "config": {"mamba_rms_norm": True, "tie_word_embeddings": False}, "seed": 0},
        {"name": "falcon_h1_norm_before_gate", "model_type": "falcon_h1",
         "config": {"mamba_rms_norm": True, "mamba_norm_before_gate": True}, "seed": 0},
        # Layers: DeltaNet, attention, DeltaNet (3 layers, interval 2): the
        # conv and recurrent state cross the prefill/decode split; attention
        # rope on 8 of 16 dims. Dense SwiGLU MLPs (num_experts 0).
        {"name": "qwen3_5", "model_type": "qwen3_5",
         "config": {"num_hidden_layers": 3, "intermediate_size": 64, "tie_word_embeddings": True},
         "seed": 1},
        # MoE (4 experts, top-2, renormalised) with the sigmoid-gated shared
        # expert on every layer: DeltaNet, attention; tied head.
        {"name": "qwen3_5_moe", "model_type": "qwen3_5_moe", "config": {}, "seed": 2},
    ]
    # Quantized: the routers (and qwen3_5's shared-expert gates) 8-bit,
    # group 64, by the model's quant_predicate (qwen3_5: keyed by mlx-lm's
    # language_model.* names).
    mg.CASES += [mg._derived("granitemoehybrid", "granitemoehybrid_q4",
                             quantize={"bits": 4, "group_size": 32}, seed=6)]
    mg.CASES += [mg._derived("qwen3_5_moe", "qwen3_5_moe_q4",
                             quantize={"bits": 4, "group_size": 32}, seed=2)]
    logits = next(k for k, row in enumerate(mg.TAPS) if row.module == "" and row.name == "logits")
    mg.TAPS[logits:logits] = _qwen3_5_taps(mg)
    mamba, mlp = _falcon_h1_taps(mg)
    _insert_before(mg, "model.layers.{i}.self_attn.q_proj", mamba)
    _insert_before(mg, "model.layers.{i}.mlp.gate_proj", mlp)
    mixtral_moe = next(k for k, row in enumerate(mg.TAPS)
                       if row.module == "model.layers.{i}.block_sparse_moe")
    mg.TAPS[mixtral_moe + 1:mixtral_moe + 1] = _granitemoehybrid_taps(mg)
    # No "layers.{i}.h" = x + self_attn: falcon_h1's h also adds the mixer,
    # granitemoehybrid's scales the attention by residual_multiplier.
    mg.SCALED_RESIDUAL_TYPES = mg.SCALED_RESIDUAL_TYPES | {"falcon_h1", "granitemoehybrid"}
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | {"granitemoehybrid"}
    _wrap_routing_stats(mg)
    register_hadamard_packs(mg)
