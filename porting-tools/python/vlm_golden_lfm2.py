"""Golden of LFM2-VL (SigLIP2-NaFlex tower, pixel unshuffle + MLP projector,
lfm2 text model), made and run by mlx-vlm.

Run through make_vlm_golden.py (``--case lfm2_vl``); the case folder has the
layout that script describes, with these differences:

    pixel_values     [Σ patches, P*P*C] each image's patches in merge-window
                     order (2 x 2 windows row-major, the patches of a window
                     row-major), each flattened as (row, column, channel):
                     the order lmspec's tower reads. mlx-vlm gets each
                     image's patches row-major, zero-padded to one batch,
                     with its pixel_attention_mask and spatial_shapes.
    image_grid_thw   [images, 3] (1, H/P, W/P) per image
    vision_features  [Σ tokens, text hidden] the projector's output, each
                     image's tokens row-major over its unshuffled grid
    logits, greedy_tokens, decode_logits
                     the prompt (each image as <|image_start|>, its tokens,
                     <|image_end|>) through mlx-vlm's lfm2 language model,
                     then 16 greedy steps through its caches
    vision_taps.NAME the tower's values under the node names of
                     specs/models/lfm2_vl_vision.yaml, per-patch rows in
                     merge-window order
    processor.safetensors
                     mlx-vlm's Lfm2VlNumpyImageProcessor (no tiling) on the
                     test images: NAME.pixel_values [patches, P*P*C] in
                     merge-window order and NAME.grid [1, 3]
"""

import copy
import json
import os

import numpy as np

import mlx.core as mx
from mlx.utils import tree_flatten

GREEDY = 16
# Patch grids (rows, columns) of the two images: the 4 x 4 position table
# upsampled to 6 x 8, and downsampled (antialiased) to 2 x 4.
GRIDS = [(6, 8), (2, 4)]
IMAGE_START, IMAGE_END = 251, 252

LFM2_CASES = {
    "lfm2_vl": {
        "model_type": "lfm2-vl",
        "downsample_factor": 2,
        "encoder_patch_size": 4,
        "image_token_id": 250,
        "projector_hidden_size": 48,
        "projector_bias": True,
        "projector_hidden_act": "gelu",
        "projector_use_layernorm": True,
        "do_image_splitting": False,
        "vision_feature_layer": -1,
        "text_config": {
            "model_type": "lfm2",
            "hidden_size": 64,
            "block_dim": 64,
            "conv_dim": 64,
            "conv_dim_out": 64,
            "num_heads": 4,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
            "norm_eps": 1e-5,
            "max_position_embeddings": 512,
            "rope_theta": 1000000.0,
            "block_ff_dim": 128,
            "block_auto_adjust_ff_dim": False,
            "block_multiple_of": 256,
            "conv_L_cache": 3,
            "conv_bias": False,
            "layer_types": ["conv", "full_attention", "conv"],
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "lfm2_vl",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_channels": 3,
            "patch_size": 4,
            "num_patches": 16,
            "layer_norm_eps": 1e-6,
        },
    },
}

PROCESSORS = {
    "lfm2_vl": {
        "image_processor_type": "Lfm2VlImageProcessor",
        "do_image_splitting": False,
        "downsample_factor": 2,
        "encoder_patch_size": 4,
        "min_image_tokens": 4,
        "max_image_tokens": 16,
        "max_pixels_tolerance": 2.0,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_resize": False,
    },
}


def window_order(h, w, m=2):
    """Row-major patch indices of an h x w grid in merge-window order."""
    idx = np.arange(h * w).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3)
    return idx.reshape(-1)


def build(cfg):
    from mlx_vlm.models.lfm2_vl import Model, ModelConfig
    from mlx_vlm.models.lfm2_vl.config import TextConfig, VisionConfig

    import inspect

    cfg = copy.deepcopy(cfg)
    known = inspect.signature(ModelConfig).parameters
    top = {k: v for k, v in cfg.items()
           if k in known and k not in ("text_config", "vision_config")}
    config = ModelConfig(
        text_config=TextConfig.from_dict(cfg["text_config"]),
        vision_config=VisionConfig.from_dict(cfg["vision_config"]),
        **top,
    )
    return Model(config)


def vision_taps(model, padded, shapes, mask):
    """The tower step by step for each image alone, under lfm2_vl_vision's
    names, rows in merge-window order, images concatenated."""
    vt = model.vision_tower
    taps = {}
    for i, (h, w) in enumerate(shapes):
        n = h * w
        order = window_order(h, w)
        x = padded[i:i + 1, :n]
        sh = mx.array([[h, w]], dtype=mx.int32)
        one = {}
        one["patches"] = vt.embeddings.patch_embedding(x)
        emb = vt.embeddings(x, spatial_shapes=sh)
        one["positions"] = emb - one["patches"]
        one["embed"] = emb
        hh = emb
        for j, layer in enumerate(vt.encoder.layers):
            if j == 0:
                ln1 = layer.layer_norm1(hh)
                one["layers.0.ln1"] = ln1
                o = layer.self_attn(ln1)
                one["layers.0.o"] = o
                one["layers.0.fc2"] = layer.mlp(layer.layer_norm2(hh + o))
            hh = layer(hh)
            one[f"layers.{j}"] = hh
        hh = vt.post_layernorm(hh)
        one["post_ln"] = hh
        for k, v in one.items():
            taps.setdefault(k, []).append(v[0][mx.array(order)])
    return {k: mx.concatenate(v, axis=0) for k, v in taps.items()}


def prompt(cfg, counts):
    image = cfg["image_token_id"]
    ids = [1, 5, 6]
    for k, n in enumerate(counts):
        ids += [IMAGE_START] + [image] * n + [IMAGE_END] + [7 + 2 * k, 8 + 2 * k]
    return ids


def write_tokenizer(out, cfg):
    vocab = {"<|pad|>": 0, "<|startoftext|>": 1, "user": 3, "assistant": 4}
    for i in range(5, 250):
        vocab[f"w{i}"] = i
    specials = {"<image>": cfg["image_token_id"], "<|image_start|>": IMAGE_START,
                "<|image_end|>": IMAGE_END, "<|im_start|>": 253, "<|im_end|>": 254,
                "<|endoftext|>": 255}
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
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|pad|>"},
    }
    d = os.path.join(out, "model")
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f, indent=1)
    # LFM2-VL's template writes <image> per image (the runtime expands it).
    template = ("{% for message in messages %}<|im_start|> {{ message['role'] }} "
                "{% if message['content'] is string %}{{ message['content'] }}"
                "{% else %}{% for c in message['content'] %}"
                "{% if c['type'] == 'image' %}<image> "
                "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
                "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": None,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)


def processor_fixtures(case, out, names, folder):
    from PIL import Image
    from mlx_vlm.models.lfm2_vl.processing_lfm2_vl import Lfm2VlNumpyImageProcessor

    cfg = PROCESSORS[case]
    with open(os.path.join(out, "model", "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    kwargs = {k: v for k, v in cfg.items() if k != "image_processor_type"}
    proc = Lfm2VlNumpyImageProcessor(**kwargs)
    tensors = {}
    for name in names:
        res = proc.preprocess([Image.open(os.path.join(folder, name))], return_tensors="np")
        h, w = (int(v) for v in res["spatial_shapes"][0])
        pv = np.asarray(res["pixel_values"][0][: h * w], np.float32)
        tensors[f"{name}.pixel_values"] = mx.array(pv[window_order(h, w)])
        tensors[f"{name}.grid"] = mx.array(np.array([[1, h, w]], np.int32))
        print(f"{name}: grid {h}x{w}")
    mx.save_safetensors(os.path.join(out, "processor.safetensors"), tensors)


def make_lfm2_case(args, make_images):
    case = args.case
    cfg = LFM2_CASES[case]
    out = args.out or os.path.join("goldens", "vlm", case)
    os.makedirs(os.path.join(out, "model"), exist_ok=True)

    mx.random.seed(args.seed)
    model = build(cfg)
    params = dict(tree_flatten(model.parameters()))
    rng = np.random.RandomState(args.seed)
    for name, p in params.items():
        if p.ndim == 1:
            noise = rng.standard_normal(p.shape).astype(np.float32) * 0.1
            params[name] = p + mx.array(noise)
    # A small tied table, so that the layers pick the next token.
    name = "language_model.model.embed_tokens.weight"
    params[name] = params[name] * 0.05
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    mx.save_safetensors(os.path.join(out, "model", "model.safetensors"),
                        {k: v.astype(mx.float32) for k, v in params.items()})
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    vc = cfg["vision_config"]
    p, c = vc["patch_size"], vc["num_channels"]
    width = p * p * c
    longest = max(h * w for h, w in GRIDS)
    padded = np.zeros((len(GRIDS), longest, width), np.float32)
    mask = np.zeros((len(GRIDS), longest), np.int32)
    ours = []
    for i, (h, w) in enumerate(GRIDS):
        x = rng.uniform(-1.0, 1.0, (h * w, width)).astype(np.float32)
        padded[i, : h * w] = x
        mask[i, : h * w] = 1
        ours.append(x[window_order(h, w)])
    pixel_values = mx.array(np.concatenate(ours, axis=0))
    padded, mask = mx.array(padded), mx.array(mask)
    shapes = mx.array(GRIDS, dtype=mx.int32)

    feats = model.encode_images(padded, spatial_shapes=shapes, pixel_attention_mask=mask)
    features = mx.concatenate(feats, axis=0)
    counts = [f.shape[0] for f in feats]
    taps = vision_taps(model, padded, GRIDS, mask)
    projector = model.multi_modal_projector
    merged = []
    for f in range(len(GRIDS)):
        h, w = GRIDS[f]
        one = vision_taps(model, padded[f:f + 1], [GRIDS[f]], mask[f:f + 1])["post_ln"]
        # Merge-window rows: each window's 4 patches side by side.
        merged.append(one.reshape(-1, 4 * one.shape[-1]))
    taps["merged"] = mx.concatenate(merged, axis=0)
    taps["proj_norm"] = projector.layer_norm(taps["merged"])
    taps["proj"] = projector(taps["merged"])
    mx.eval(taps)
    gap_tap = float(mx.max(mx.abs(taps["proj"] - features)).item())
    assert gap_tap < 1e-4, gap_tap

    ids_list = prompt(cfg, counts)
    ids = mx.array([ids_list], dtype=mx.int32)
    emb = model.get_input_embeddings(ids, padded, spatial_shapes=shapes,
                                     pixel_attention_mask=mask).inputs_embeds
    lm = model.language_model
    mx.eval(emb)
    logits = lm(ids, inputs_embeds=mx.array(emb)).logits
    cache = lm.make_cache()
    step = lm(ids, inputs_embeds=mx.array(emb), cache=cache).logits
    assert mx.allclose(step, logits, atol=1e-4).item()
    out_tokens, decode = [], []
    for _ in range(GREEDY):
        tok = int(mx.argmax(step[0, -1]).item())
        out_tokens.append(tok)
        step = lm(mx.array([[tok]], dtype=mx.int32), cache=cache).logits
        decode.append(step[0, -1])

    golden = {
        "pixel_values": pixel_values,
        "image_grid_thw": mx.array([[1, h, w] for h, w in GRIDS], dtype=mx.int32),
        "input_ids": ids,
        "vision_features": features.astype(mx.float32),
        "logits": logits.astype(mx.float32),
        "greedy_tokens": mx.array(out_tokens, dtype=mx.int32),
        "decode_logits": mx.stack(decode).astype(mx.float32),
    }
    golden.update({f"vision_taps.{k}": v.astype(mx.float32) for k, v in taps.items()})
    mx.save_safetensors(os.path.join(out, "golden.safetensors"), golden)

    import importlib.metadata as md
    import sys

    import PIL
    import transformers

    meta = {
        "case": case,
        "generator": "python porting-tools/python/make_vlm_golden.py " + " ".join(sys.argv[1:]),
        "mlx_version": mx.__version__,
        "mlx_vlm_version": md.version("mlx-vlm"),
        "transformers_version": transformers.__version__,
        "pillow_version": PIL.__version__,
        "seed": args.seed,
        "dtype": "float32",
        "grids": [[1, h, w] for h, w in GRIDS],
        "image_tokens": counts,
        "greedy_tokens": GREEDY,
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    folder = os.path.join(os.path.dirname(out), "images")
    names = make_images(folder)
    processor_fixtures(case, out, names, folder)
    write_tokenizer(out, cfg)
    print(f"{out}: {len(ids_list)} prompt tokens, features {features.shape}, "
          f"tokens {out_tokens}")
