#!/usr/bin/env python3
"""Tiny vision-language goldens made and run by mlx-vlm.

Each case is a folder ``goldens/vlm/CASE/``:

    model/config.json          the checkpoint's config (text keys, vision_config,
                               image token ids)
    model/model.safetensors    random float32 weights (seeded) under mlx-vlm's
                               names (vision_tower.*, language_model.*)
    golden.safetensors         the reference run:
        pixel_values     [N, C*T*P*P] flattened patches (random, seeded)
        image_grid_thw   [images, 3] patch grid of each image
        input_ids        [1, L] prompt with the image placeholders expanded
        position_ids     [3, 1, L] M-RoPE positions (get_rope_index)
        rope_delta       [1] what decoding adds to the sequence position
        vision_features  [N / merge^2, hidden] the tower's output (Qwen3-VL:
                         [N / merge^2, (1 + levels) * hidden], the merger's
                         rows then each DeepStack level's, as lmspec's tower
                         gives them)
        logits           [1, L, vocab] the whole prompt, no cache
        greedy_tokens    [16] greedy continuation: the prompt prefilled into
                         a KV cache, then one token per step
        decode_logits    [16, vocab] the logits of each of those steps
        vision_taps.NAME the tower's intermediate values under lmspec's
                         tap names (`lmspec port diff --golden` on the case
                         compares them node by node); Qwen2.5-VL's in the
                         processor's patch order (mlx-vlm runs its blocks
                         in attention-window order)
    meta.json                  generator command and versions
    model/tokenizer.json, tokenizer_config.json
                               a word-level tokenizer over the tiny vocabulary
                               (w4..w249 and the image/chat special tokens)
                               and a chat template that writes one
                               placeholder per image, for the CLI tests
    model/preprocessor_config.json   the image processor's settings (the
                               family's processor with this tiny tower's
                               patch size)
    processor.safetensors      the Python image processor's output for each
                               image of goldens/vlm/images/: NAME.pixel_values
                               [N, C*T*P*P] and NAME.grid [1, 3]; for alpha.png
                               and gray.png also
                               NAME.bilinear.pixel_values (resample 2)

The images (goldens/vlm/images/) are made here too: different sizes and
aspect ratios, a PNG with alpha, a grayscale PNG, two JPEGs.

The golden tests read only these files; generating them needs mlx-vlm, in
an environment of its own (mlx-vlm 0.7.10 needs mlx >= 0.32.4):

    python3 -m venv /tmp/vlmvenv
    /tmp/vlmvenv/bin/pip install "mlx[cpu]>=0.32.4" mlx-vlm==0.7.10
    /tmp/vlmvenv/bin/python porting-tools/python/make_vlm_golden.py --case qwen2_vl

Cases here: qwen2_vl, qwen2_5_vl (window attention), qwen3_vl (position
table, DeepStack), qwen2_vl_video (the qwen2_vl checkpoint on a 4-frame
video; golden.safetensors and processor.safetensors only, the latter a
3-frame video's video.pixel_values and video.grid); the SigLIP, Pixtral and LFM2-VL towers' cases come from
their own modules.
"""

import argparse
import json
import os
import sys

import numpy as np

import mlx.core as mx
from mlx.utils import tree_flatten

# The SigLIP-tower families (Gemma 3) live in their own module.
from vlm_golden_siglip import SIGLIP_CASES, make_siglip_case
# The Pixtral-tower families likewise.
from vlm_golden_pixtral import PIXTRAL_CASES, make_pixtral_case
# LFM2-VL (SigLIP2-NaFlex tower, lfm2 text) likewise.
from vlm_golden_lfm2 import LFM2_CASES, make_lfm2_case

GREEDY = 16

CASES = {
    "qwen2_vl": {
        "model_type": "qwen2_vl",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": 256,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "image_token_id": 250,
        "video_token_id": 251,
        "vision_start_token_id": 252,
        "vision_end_token_id": 253,
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2.0,
            "in_channels": 3,
            "patch_size": 4,
            "spatial_patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    },
}

# Qwen2.5-VL: the same text model; the tower has RMSNorm, a gated SiLU MLP
# and window attention (16-pixel windows: 2 x 2 merge windows) in all but
# the full-attention blocks.
CASES["qwen2_5_vl"] = {
    **{k: v for k, v in CASES["qwen2_vl"].items() if k != "vision_config"},
    "model_type": "qwen2_5_vl",
    "vision_config": {
        "model_type": "qwen2_5_vl",
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 48,
        "out_hidden_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 4,
        "spatial_patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 16,
        "fullatt_block_indexes": [2],
        "tokens_per_second": 2,
    },
}

# Qwen3-VL: a qwen3 text model (q/k norms, interleaved M-RoPE) under
# text_config; the tower has a learned 4 x 4 position table and two
# DeepStack levels (after blocks 0 and 1), added after text layers 0 and 1.
CASES["qwen3_vl"] = {
    "model_type": "qwen3_vl",
    "image_token_id": 250,
    "video_token_id": 251,
    "vision_start_token_id": 252,
    "vision_end_token_id": 253,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 256,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "qwen3_vl",
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0, 1],
    },
}

# Qwen3-VL-MoE: Qwen3-VL's tower and text model with a softmax top-2 of 4
# experts in layers 0 and 1, layer 2 dense (mlp_only_layers).
CASES["qwen3_vl_moe"] = {
    **CASES["qwen3_vl"],
    "model_type": "qwen3_vl_moe",
    "text_config": {
        **CASES["qwen3_vl"]["text_config"],
        "model_type": "qwen3_vl_moe_text",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [2],
        "norm_topk_prob": True,
    },
    "vision_config": {**CASES["qwen3_vl"]["vision_config"], "model_type": "qwen3_vl_moe"},
}

# The image processor of each case: the family's Python processor class and
# its settings (real mean/std and filter, this tower's patch size, pixel
# bounds that keep the fixtures small).
PROCESSORS = {
    "qwen2_vl": {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "min_pixels": 1024,
        "max_pixels": 4096,
        "patch_size": 4,
        "temporal_patch_size": 2,
        "merge_size": 2,
    },
}


# Qwen2.5-VL's processor is Qwen2-VL's; other pixel bounds here.
PROCESSORS["qwen2_5_vl"] = {**PROCESSORS["qwen2_vl"], "min_pixels": 1024, "max_pixels": 3136}
# Qwen3-VL's: mean and std of 0.5, pixel bounds as size.shortest_edge /
# longest_edge, the bilinear filter.
PROCESSORS["qwen3_vl"] = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
    "size": {"shortest_edge": 1024, "longest_edge": 2048},
    "patch_size": 4,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


PROCESSORS["qwen3_vl_moe"] = PROCESSORS["qwen3_vl"]


def make_images(folder):
    """Five small test images (seeded), written once."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(7)

    def rgb(w, h):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1),
                         (x + y) * 127 / max(w + h - 2, 1)], axis=-1)
        noise = rng.randint(-40, 40, (h, w, 3))
        return np.clip(base + noise, 0, 255).astype(np.uint8)

    Image.fromarray(rgb(150, 41)).save(os.path.join(folder, "wide.png"))
    Image.fromarray(rgb(33, 90)).save(os.path.join(folder, "tall.jpg"), quality=92, subsampling=0)
    rgba = np.concatenate([rgb(50, 50), rng.randint(0, 256, (50, 50, 1)).astype(np.uint8)], -1)
    rgba[:10, :10, 3] = 0
    rgba[-10:, -10:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(os.path.join(folder, "alpha.png"))
    Image.fromarray(rgb(47, 61)[:, :, 0], "L").save(os.path.join(folder, "gray.png"))
    Image.fromarray(rgb(200, 130)).save(os.path.join(folder, "photo.jpg"), quality=90)
    return ["wide.png", "tall.jpg", "alpha.png", "gray.png", "photo.jpg"]


def write_tokenizer(out):
    """A word-level tokenizer for the tiny vocabulary and a chat template in
    the family's shape (image entries become placeholders)."""
    vocab = {"[UNK]": 0, "user": 1, "assistant": 2, "system": 3}
    for i in range(4, 250):
        vocab[f"w{i}"] = i
    specials = {"<|image_pad|>": 250, "<|video_pad|>": 251, "<|vision_start|>": 252,
                "<|vision_end|>": 253, "<|im_start|>": 254, "<|im_end|>": 255}
    vocab.update(specials)
    tok = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for t, i in specials.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
    d = os.path.join(out, "model")
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f, indent=1)
    template = ("{% for message in messages %}<|im_start|>{{ message['role'] }} "
                "{% if message['content'] is string %}{{ message['content'] }}"
                "{% else %}{% for c in message['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
                "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
                "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": None,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)


def processor_fixtures(case, out):
    from PIL import Image

    cfg = PROCESSORS[case]
    with open(os.path.join(out, "model", "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    folder = os.path.join(os.path.dirname(out), "images")
    names = make_images(folder)
    if case in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as Processor,
        )
    kwargs = {k: v for k, v in cfg.items() if k != "image_processor_type"}
    proc = Processor(**kwargs)
    tensors = {}
    for name in names:
        res = proc(images=[Image.open(os.path.join(folder, name))], return_tensors="np")
        tensors[f"{name}.pixel_values"] = mx.array(np.asarray(res["pixel_values"], np.float32))
        tensors[f"{name}.grid"] = mx.array(np.asarray(res["image_grid_thw"], np.int32))
        print(f"{name}: grid {res['image_grid_thw'].tolist()}")
    # The bilinear filter too, on two PNGs.
    proc = Processor(**{**kwargs, "resample": 2})
    for name in ["alpha.png", "gray.png"]:
        res = proc(images=[Image.open(os.path.join(folder, name))], return_tensors="np")
        tensors[f"{name}.bilinear.pixel_values"] = mx.array(np.asarray(res["pixel_values"], np.float32))
    mx.save_safetensors(os.path.join(out, "processor.safetensors"), tensors)


# Two images per case: Qwen2-VL's a 4 x 6 and a 4 x 4 patch grid (6 and 4
# merged tokens); Qwen2.5-VL's a 6 x 10 grid (3 x 5 merge windows: full,
# cut and single-column attention windows) and a 4 x 4 one (one window).
GRIDS = {
    "qwen2_vl": [[1, 4, 6], [1, 4, 4]],
    "qwen2_5_vl": [[1, 6, 10], [1, 4, 4]],
    "qwen3_vl": [[1, 4, 6], [1, 6, 4]],
    "qwen3_vl_moe": [[1, 4, 6], [1, 6, 4]],
}


def build(case, cfg):
    if case == "qwen2_vl":
        from mlx_vlm.models.qwen2_vl import Model, ModelConfig
        from mlx_vlm.models.qwen2_vl.config import TextConfig, VisionConfig
    elif case == "qwen2_5_vl":
        from mlx_vlm.models.qwen2_5_vl import Model, ModelConfig
        from mlx_vlm.models.qwen2_5_vl.config import TextConfig, VisionConfig
    elif case in ("qwen3_vl", "qwen3_vl_moe"):
        import importlib

        module = importlib.import_module(f"mlx_vlm.models.{case}")
        return module.Model(module.ModelConfig.from_dict(json.loads(json.dumps(cfg))))
    else:
        raise SystemExit(f"unknown case {case}")
    text = {k: v for k, v in cfg.items() if k != "vision_config"}
    config = ModelConfig(
        text_config=TextConfig.from_dict(text),
        vision_config=VisionConfig.from_dict(cfg["vision_config"]),
        model_type=cfg["model_type"],
        image_token_id=cfg["image_token_id"],
        video_token_id=cfg["video_token_id"],
        vision_start_token_id=cfg["vision_start_token_id"],
        vocab_size=cfg["vocab_size"],
    )
    return Model(config)


def vision_taps(case, vt, pixel_values, grid):
    """The tower run module by module, each value under the name of the
    lmspec node that computes it (specs/models/CASE_vision.yaml)."""
    if case == "qwen2_5_vl":
        return window_taps(vt, pixel_values, grid)
    if case in ("qwen3_vl", "qwen3_vl_moe"):
        return deepstack_taps(vt, pixel_values, grid)
    taps = {}
    h = vt.patch_embed(pixel_values)
    taps["patches"] = h
    rot = vt.rot_pos_emb(grid)
    lens = []
    for t, hh, ww in grid.tolist():
        lens += [hh * ww] * t
    cu = mx.pad(mx.cumsum(mx.array(lens, dtype=mx.int32)), (1, 0))
    for i, blk in enumerate(vt.blocks):
        n1 = blk.norm1(h)
        taps[f"layers.{i}.norm1"] = n1
        taps[f"layers.{i}.qkv"] = blk.attn.qkv(n1)
        proj = blk.attn(n1, cu_seqlens=cu, rotary_pos_emb=rot)
        taps[f"layers.{i}.proj"] = proj
        h = h + proj
        taps[f"layers.{i}.h"] = h
        n2 = blk.norm2(h)
        taps[f"layers.{i}.norm2"] = n2
        fc1 = blk.mlp.fc1(n2)
        taps[f"layers.{i}.fc1"] = fc1
        fc2 = blk.mlp.fc2(blk.mlp.activation_fn(fc1))
        taps[f"layers.{i}.fc2"] = fc2
        h = h + fc2
        taps[f"layers.{i}"] = h
    m = vt.merger
    ln = m.ln_q(h)
    taps["ln_q"] = ln
    x = ln.reshape(-1, m.hidden_size)
    taps["merged"] = x
    x = m.mlp[0](x)
    taps["fc1"] = x
    x = m.mlp[1](x)
    taps["act"] = x
    taps["fc2"] = m.mlp[2](x)
    return taps


def window_taps(vt, pixel_values, grid):
    """Qwen2.5-VL's tower: mlx-vlm regroups the merge windows by attention
    window and back after the merger; lmspec keeps the processor's order and
    masks each window, so the taps are put back in that order."""
    import mlx.nn as nn

    taps = {}
    h = vt.patch_embed(pixel_values)
    taps["patches"] = h
    n = h.shape[0]
    unit = vt.spatial_merge_unit
    rot = vt.rot_pos_emb(grid)
    window_index, cu_window = vt.get_window_index(grid)
    cu_window = mx.array(sorted(set(cu_window.tolist())), dtype=mx.int32)
    back = mx.argsort(window_index)

    def regroup(x, order):
        return x.reshape(n // unit, unit, -1)[order].reshape(n, -1)

    h = regroup(h, window_index)
    rot = regroup(rot, window_index)
    lens = []
    for t, hh, ww in grid.tolist():
        lens += [hh * ww] * t
    cu = mx.pad(mx.cumsum(mx.array(lens, dtype=mx.int32)), (1, 0))
    for i, blk in enumerate(vt.blocks):
        cu_now = cu if i in vt.fullatt_block_indexes else cu_window
        n1 = blk.norm1(h)
        taps[f"layers.{i}.norm1"] = regroup(n1, back)
        taps[f"layers.{i}.qkv"] = regroup(blk.attn.qkv(n1), back)
        proj = blk.attn(n1, cu_seqlens=cu_now, rotary_pos_emb=rot)
        taps[f"layers.{i}.proj"] = regroup(proj, back)
        h = h + proj
        taps[f"layers.{i}.h"] = regroup(h, back)
        n2 = blk.norm2(h)
        taps[f"layers.{i}.norm2"] = regroup(n2, back)
        gate = blk.mlp.gate_proj(n2)
        up = blk.mlp.up_proj(n2)
        taps[f"layers.{i}.gate"] = regroup(gate, back)
        taps[f"layers.{i}.up"] = regroup(up, back)
        down = blk.mlp.down_proj(nn.silu(gate) * up)
        taps[f"layers.{i}.down"] = regroup(down, back)
        h = h + down
        taps[f"layers.{i}"] = regroup(h, back)
    m = vt.merger
    ln = m.ln_q(h)
    taps["ln_q"] = regroup(ln, back)
    x = ln.reshape(-1, m.hidden_size)
    taps["merged"] = x[back]
    x = m.mlp[0](x)
    taps["fc1"] = x[back]
    x = m.mlp[1](x)
    taps["act"] = x[back]
    taps["fc2"] = m.mlp[2](x)[back]
    return taps


def deepstack_taps(vt, pixel_values, grid):
    """Qwen3-VL's tower: the position table, the blocks, the merger and each
    DeepStack level's merger (specs/models/qwen3_vl_vision.yaml)."""
    taps = {}
    h = vt.patch_embed(pixel_values)
    taps["patches"] = h
    pos = vt.fast_pos_embed_interpolate(grid)
    taps["pos"] = pos
    h = h + pos
    taps["embed"] = h
    rot = vt.rot_pos_emb(grid)
    lens = []
    for t, hh, ww in grid.tolist():
        lens += [hh * ww] * t
    cu = mx.pad(mx.cumsum(mx.array(lens, dtype=mx.int32)), (1, 0))
    kept = []
    for i, blk in enumerate(vt.blocks):
        n1 = blk.norm1(h)
        taps[f"layers.{i}.norm1"] = n1
        taps[f"layers.{i}.qkv"] = blk.attn.qkv(n1)
        proj = blk.attn(n1, cu_seqlens=cu, rotary_pos_emb=rot)
        taps[f"layers.{i}.proj"] = proj
        h = h + proj
        taps[f"layers.{i}.h"] = h
        n2 = blk.norm2(h)
        taps[f"layers.{i}.norm2"] = n2
        fc1 = blk.mlp.linear_fc1(n2)
        taps[f"layers.{i}.fc1"] = fc1
        fc2 = blk.mlp.linear_fc2(blk.mlp.act_fn(fc1))
        taps[f"layers.{i}.fc2"] = fc2
        h = h + fc2
        taps[f"layers.{i}"] = h
        if i in vt.deepstack_visual_indexes:
            kept.append(h)

    def merger(m, x, prefix):
        if m.use_postshuffle_norm:
            x = x.reshape(-1, m.hidden_size)
            taps[f"{prefix}merged"] = x
            x = m.norm(x)
            taps[f"{prefix}norm"] = x
        else:
            x = m.norm(x)
            taps[f"{prefix}norm"] = x
            x = x.reshape(-1, m.hidden_size)
            taps[f"{prefix}merged"] = x
        x = m.linear_fc1(x)
        taps[f"{prefix}fc1"] = x
        x = m.act_fn(x)
        taps[f"{prefix}act"] = x
        x = m.linear_fc2(x)
        taps[f"{prefix}fc2"] = x
        return x

    out = merger(vt.merger, h, "")
    for k, (m, x) in enumerate(zip(vt.deepstack_merger_list, kept)):
        out = mx.concatenate([out, merger(m, x, f"ds{k}_")], axis=-1)
        taps[f"cat{k}"] = out
    return taps


def prompt(cfg, merge, grids):
    start, end, image = (cfg["vision_start_token_id"], cfg["vision_end_token_id"],
                         cfg["image_token_id"])
    ids = [5, 6]
    for k, (t, h, w) in enumerate(grids):
        ids += [start] + [image] * (t * h * w // (merge * merge)) + [end]
        ids += [7 + 2 * k, 8 + 2 * k]
    return ids


# The video case: the qwen2_vl checkpoint (already written by --case
# qwen2_vl) on one video of 4 frames (2 temporal groups of a 4 x 6 patch
# grid: 12 tokens) between two texts.
VIDEO_GRID = [2, 4, 6]


def make_video_case(args):
    """goldens/vlm/qwen2_vl_video/: mlx-vlm's qwen2_vl given the video as
    ``pixel_values_videos`` / ``video_grid_thw`` with ``<|video_pad|>``
    tokens in the prompt; the processor fixture of a 3-frame video."""
    from mlx_vlm.models.cache import KVCache

    src = os.path.join("goldens", "vlm", "qwen2_vl")
    out = args.out or os.path.join("goldens", "vlm", "qwen2_vl_video")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(src, "model", "config.json")) as f:
        cfg = json.load(f)
    model = build("qwen2_vl", cfg)
    model.load_weights(list(mx.load(os.path.join(src, "model", "model.safetensors")).items()))
    mx.eval(model.parameters())
    vc = cfg["vision_config"]
    merge = vc["spatial_merge_size"]
    width = vc["in_channels"] * vc["temporal_patch_size"] * vc["patch_size"] ** 2
    t, h, w = VIDEO_GRID
    rng = np.random.RandomState(args.seed + 7)
    pixel_values = mx.array(rng.uniform(-1.5, 1.5, (t * h * w, width)).astype(np.float32))
    grid = mx.array([VIDEO_GRID], dtype=mx.int32)
    video = cfg["video_token_id"]
    ids = [5, 6, cfg["vision_start_token_id"]] + [video] * (t * h * w // merge**2)
    ids += [cfg["vision_end_token_id"], 7, 8]
    ids = mx.array([ids], dtype=mx.int32)
    features = model.vision_tower(pixel_values, grid)
    lm = model.language_model
    position_ids, delta = lm.get_rope_index(ids, None, grid)
    kw = {"pixel_values_videos": pixel_values, "video_grid_thw": grid}
    lm._rope_deltas = None
    lm._position_ids = None
    logits = model(ids, None, **kw).logits
    lm._rope_deltas = None
    lm._position_ids = None
    cache = [KVCache() for _ in lm.model.layers]
    step = model(ids, None, cache=cache, **kw).logits
    tokens, decode = [], []
    for _ in range(GREEDY):
        tok = int(mx.argmax(step[0, -1]).item())
        tokens.append(tok)
        step = lm(mx.array([[tok]], dtype=mx.int32), cache=cache).logits
        decode.append(step[0, -1])
    golden = {
        "pixel_values": pixel_values,
        "video_grid_thw": grid,
        "input_ids": ids,
        "position_ids": position_ids.astype(mx.int32),
        "rope_delta": mx.array([int(delta.reshape(-1)[0].item())], dtype=mx.int32),
        "vision_features": features.astype(mx.float32),
        "logits": logits.astype(mx.float32),
        "greedy_tokens": mx.array(tokens, dtype=mx.int32),
        "decode_logits": mx.stack(decode).astype(mx.float32),
    }
    mx.save_safetensors(os.path.join(out, "golden.safetensors"), golden)
    video_fixture(cfg, out)
    import importlib.metadata as md
    import PIL
    import transformers

    meta = {
        "case": args.case,
        "generator": "python porting-tools/python/make_vlm_golden.py " + " ".join(sys.argv[1:]),
        "checkpoint": "goldens/vlm/qwen2_vl/model",
        "mlx_version": mx.__version__,
        "mlx_vlm_version": md.version("mlx-vlm"),
        "transformers_version": transformers.__version__,
        "pillow_version": PIL.__version__,
        "seed": args.seed,
        "dtype": "float32",
        "video_grid": VIDEO_GRID,
        "greedy_tokens": GREEDY,
        "video_frames": VIDEO_FRAMES,
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"{out}: {ids.shape[1]} prompt tokens, features {features.shape}, tokens {tokens}")


# The processor fixture's video: three frames of different sizes (each
# resized to the first frame's target), so the last group repeats the
# last frame.
VIDEO_FRAMES = ["photo.jpg", "wide.png", "gray.png"]


def video_fixture(cfg, out):
    """The processor's output for VIDEO_FRAMES. transformers' video
    processor needs torch (absent here): each frame goes through
    Qwen2VLImageProcessorPil after Pillow resizes it to the first frame's
    smart_resize target (the processor keeps that size), and the frames'
    patches are grouped as the video processor groups them (the last frame
    repeated to fill a group; per patch (channel, frame, row, column))."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil as Processor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    pcfg = PROCESSORS["qwen2_vl"]
    proc = Processor(**{k: v for k, v in pcfg.items() if k != "image_processor_type"})
    folder = os.path.join("goldens", "vlm", "images")
    frames = [Image.open(os.path.join(folder, n)).convert("RGB") for n in VIDEO_FRAMES]
    p, m, tp = pcfg["patch_size"], pcfg["merge_size"], pcfg["temporal_patch_size"]
    th, tw = smart_resize(frames[0].height, frames[0].width, factor=p * m,
                          min_pixels=pcfg["min_pixels"], max_pixels=pcfg["max_pixels"])
    per_frame = []
    for k, fr in enumerate(frames):
        if k > 0:
            fr = fr.resize((tw, th), Image.Resampling.BICUBIC)
        res = proc(images=[fr], return_tensors="np")
        assert res["image_grid_thw"].tolist() == [[1, th // p, tw // p]]
        # [patches, C, T, P, P]: the frame repeated T times; keep one.
        v = np.asarray(res["pixel_values"], np.float32).reshape(-1, 3, tp, p, p)[:, :, 0]
        per_frame.append(v)
    while len(per_frame) % tp:
        per_frame.append(per_frame[-1])
    gt = len(per_frame) // tp
    # [gt, tp, patches, C, P, P] -> [gt, patches, C, tp, P, P]
    x = np.stack(per_frame).reshape(gt, tp, -1, 3, p, p).transpose(0, 2, 3, 1, 4, 5)
    pixels = x.reshape(-1, 3 * tp * p * p)
    grid = [gt, th // p, tw // p]
    mx.save_safetensors(os.path.join(out, "processor.safetensors"), {
        "video.pixel_values": mx.array(np.ascontiguousarray(pixels)),
        "video.grid": mx.array([grid], dtype=mx.int32),
    })
    print(f"video of {len(frames)} frames: grid {grid}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, choices=sorted(CASES) + ["qwen2_vl_video"] + sorted(SIGLIP_CASES) + sorted(PIXTRAL_CASES) + sorted(LFM2_CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.case == "qwen2_vl_video":
        return make_video_case(args)
    if args.case in SIGLIP_CASES:
        return make_siglip_case(args, make_images)
    if args.case in PIXTRAL_CASES:
        return make_pixtral_case(args, make_images)
    if args.case in LFM2_CASES:
        return make_lfm2_case(args, make_images)
    cfg = CASES[args.case]
    out = args.out or os.path.join("goldens", "vlm", args.case)
    os.makedirs(os.path.join(out, "model"), exist_ok=True)

    mx.random.seed(args.seed)
    model = build(args.case, cfg)
    params = dict(tree_flatten(model.parameters()))
    # LayerNorm/RMSNorm weights start at one and biases at zero: perturb
    # them so that a missed weight or bias shows in the outputs.
    rng = np.random.RandomState(args.seed)
    for name, p in params.items():
        if p.ndim == 1:
            noise = rng.standard_normal(p.shape).astype(np.float32) * 0.1
            params[name] = p + mx.array(noise)
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    mx.save_safetensors(os.path.join(out, "model", "model.safetensors"),
                        {k: v.astype(mx.float32) for k, v in params.items()})
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    vc = cfg["vision_config"]
    merge = vc["spatial_merge_size"]
    width = vc["in_channels"] * vc["temporal_patch_size"] * vc["patch_size"] ** 2
    grids = GRIDS[args.case]
    n = sum(t * h * w for t, h, w in grids)
    pixel_values = mx.array(rng.uniform(-1.5, 1.5, (n, width)).astype(np.float32))
    grid = mx.array(grids, dtype=mx.int32)
    ids = mx.array([prompt(cfg, merge, grids)], dtype=mx.int32)

    features = model.vision_tower(pixel_values, grid)
    if isinstance(features, tuple):
        # DeepStack: the levels follow the merger's columns in each row.
        features = mx.concatenate([features[0], *features[1]], axis=-1)
    taps = vision_taps(args.case, model.vision_tower, pixel_values, grid)
    mx.eval(taps)
    last = [k for k in ("cat2", "cat1", "cat0", "fc2") if k in taps][0]
    assert mx.allclose(taps[last], features).item()
    lm = model.language_model
    position_ids, delta = lm.get_rope_index(ids, grid)
    lm._rope_deltas = None
    lm._position_ids = None
    logits = model(ids, pixel_values, image_grid_thw=grid).logits

    from mlx_vlm.models.cache import KVCache

    lm._rope_deltas = None
    lm._position_ids = None
    cache = [KVCache() for _ in lm.model.layers]
    step = model(ids, pixel_values, cache=cache, image_grid_thw=grid).logits
    tokens, decode = [], []
    for _ in range(GREEDY):
        tok = int(mx.argmax(step[0, -1]).item())
        tokens.append(tok)
        step = lm(mx.array([[tok]], dtype=mx.int32), cache=cache).logits
        decode.append(step[0, -1])

    golden = {
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
        "input_ids": ids,
        "position_ids": position_ids.astype(mx.int32),
        "rope_delta": mx.array([int(delta.reshape(-1)[0].item())], dtype=mx.int32),
        "vision_features": features.astype(mx.float32),
        "logits": logits.astype(mx.float32),
        "greedy_tokens": mx.array(tokens, dtype=mx.int32),
        "decode_logits": mx.stack(decode).astype(mx.float32),
    }
    golden.update({f"vision_taps.{k}": v.astype(mx.float32) for k, v in taps.items()})
    mx.save_safetensors(os.path.join(out, "golden.safetensors"), golden)
    import importlib.metadata as md

    meta = {
        "case": args.case,
        "generator": "python porting-tools/python/make_vlm_golden.py "
                     + " ".join(sys.argv[1:]),
        "mlx_version": mx.__version__,
        "mlx_vlm_version": md.version("mlx-vlm"),
        "seed": args.seed,
        "dtype": "float32",
        "grids": grids,
        "greedy_tokens": GREEDY,
    }
    import PIL
    import transformers

    meta["transformers_version"] = transformers.__version__
    meta["pillow_version"] = PIL.__version__
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    processor_fixtures(args.case, out)
    write_tokenizer(out)
    print(f"{out}: {ids.shape[1]} prompt tokens, features {features.shape}, "
          f"tokens {tokens}")


if __name__ == "__main__":
    main()
