"""Golden cases in Hugging Face checkpoint layouts that need the weight
rules `moveaxis`, `add` and `split`: mamba2's and lfm2's depthwise
convolutions as [C, 1, K]; qwen3_next with per-expert tensors, zero-centred
norms (w for 1 + w), the convolution as [C, 1, K] and an unused
multi-token-prediction tensor; granitemoe's experts with gate and up fused
in input_linear [E, 2F, D]; deepseek_v3 with per-expert tensors and its
latent attention's kv_b_proj unsplit. mlx-lm's sanitize turns each back into the
model as built."""
import re

import mlx.core as mx


def mamba2_to_hf(weights, config):
    return {k: (v.moveaxis(2, 1) if k.endswith("mixer.conv1d.weight") else v)
            for k, v in weights.items()}


def lfm2_to_hf(weights, config):
    return {k: (v.transpose(0, 2, 1) if k.endswith("conv.conv.weight") else v)
            for k, v in weights.items()}


QWEN3_NEXT_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight",
                    "model.norm.weight", ".q_norm.weight", ".k_norm.weight")


def qwen3_next_to_hf(weights, config):
    out = {}
    for k, v in weights.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp)\.switch_mlp\.(\w+)\.weight", k)
        if m:
            for e in range(v.shape[0]):
                out[f"{m.group(1)}.experts.{e}.{m.group(2)}.weight"] = v[e]
            continue
        if k.endswith("conv1d.weight"):
            v = v.moveaxis(2, 1)
        if any(k.endswith(s) for s in QWEN3_NEXT_NORMS) and v.ndim == 1:
            v = v - 1.0
        out[k] = v
    # A multi-token-prediction tensor, which mlx-lm (and the spec) drop.
    out["mtp.fc.weight"] = mx.zeros((4, 4))
    return out


def granitemoe_to_hf(weights, config):
    out = {}
    for k, v in weights.items():
        if k.endswith("switch_mlp.gate_proj.weight"):
            up = weights[k.replace("gate_proj", "up_proj")]
            out[k.replace("switch_mlp.gate_proj", "input_linear")] = mx.concatenate([v, up], 1)
        elif k.endswith("switch_mlp.up_proj.weight"):
            continue
        elif k.endswith("switch_mlp.down_proj.weight"):
            out[k.replace("switch_mlp.down_proj", "output_linear")] = v
        else:
            out[k] = v
    return out


def deepseek_v3_to_hf(weights, config):
    """Per-expert tensors and kv_b_proj unsplit [heads * (nope + v), rank]."""
    out = {}
    for k, v in weights.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp)\.switch_mlp\.(\w+)\.weight", k)
        if m:
            for e in range(v.shape[0]):
                out[f"{m.group(1)}.experts.{e}.{m.group(2)}.weight"] = v[e]
        elif k.endswith("self_attn.embed_q.weight"):
            up = weights[k.replace("embed_q", "unembed_out")]
            kv_b = mx.concatenate([v.swapaxes(-1, -2), up], axis=1)
            out[k.replace("embed_q", "kv_b_proj")] = kv_b.reshape(-1, kv_b.shape[-1])
        elif k.endswith("self_attn.unembed_out.weight"):
            continue
        else:
            out[k] = v
    return out


def register(mg):
    mg.HF_LAYOUTS.update({
        "mamba2": (mamba2_to_hf, {"format": "pt"}),
        "lfm2": (lfm2_to_hf, {"format": "pt"}),
        "qwen3_next": (qwen3_next_to_hf, {"format": "pt"}),
        "granitemoe": (granitemoe_to_hf, {"format": "pt"}),
        "deepseek_v3": (deepseek_v3_to_hf, {"format": "pt"}),
    })
    import copy
    for base in ("mamba2", "lfm2", "qwen3_next", "granitemoe", "deepseek_v3"):
        case = copy.deepcopy(next(c for c in mg.CASES if c["name"] == base))
        mg.CASES.append({**case, "name": f"{base}_hf", "hf_layout": base})
