"""Golden cases of issue 23's norm/activation/rope and attention options:
nemotron, nanochat, ... (one family module; see README.md)."""
import dataclasses

# Types whose layer is not llama's with llama's module names meaning llama's
# things (checked by the generic tap checks instead of the llama ones).
OWN_LAYOUT = {"nemotron", "nanochat", "llama4_text", "apertus", "dbrx"}

TYPE_DEFAULTS = {
    "nemotron": {"norm_eps": 1e-5, "hidden_act": "relu2", "partial_rotary_factor": 0.5},
    # nanochat's ModelArgs has defaults for everything; the base keys it reads.
    "nanochat": {"num_key_value_heads": 4},
    "llama4_text": {"head_dim": 16, "intermediate_size_mlp": 96, "use_qk_norm": True,
                    "no_rope_layers": [1, 0]},
    "dbrx": {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256,
             "attn_config": {"kv_n_heads": 2, "clip_qkv": 1.0, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}},
    "apertus": {"mlp_bias": True, "attention_bias": False, "post_norm": False, "qk_norm": True},
}

TYPE_UNUSED_BASE_KEYS = {
    "nemotron": ["rms_norm_eps"],
    "nanochat": ["rms_norm_eps", "tie_word_embeddings"],
    "dbrx": None,  # set in register: every BASE_CONFIG key
}

CASES = [
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
    # Wqkv clamped to ±1 (about 40% of its outputs clipped), top-2 of 4
    # experts by a float32 softmax, renormalised.
    {"name": "dbrx", "model_type": "dbrx", "config": {}},
]


def register(mg):
    mg.TYPE_DEFAULTS.update(TYPE_DEFAULTS)
    mg.TYPE_UNUSED_BASE_KEYS.update(TYPE_UNUSED_BASE_KEYS)
    mg.TYPE_UNUSED_BASE_KEYS["dbrx"] = list(mg.BASE_CONFIG)
    mg.CASES += CASES
    mg.LLAMA_MATH_EXCLUDED = mg.LLAMA_MATH_EXCLUDED | OWN_LAYOUT
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
    at = len(mg.TAPS) - 1  # before the logits row
    mg.TAPS[at:at] = [dataclasses.replace(row, applies=_only(OWN_LAYOUT)) for row in rows]


def _only(types):
    def check(model_type, config):
        return model_type in types
    return check
