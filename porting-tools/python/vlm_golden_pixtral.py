"""Goldens of the Pixtral-tower families (Pixtral, Mistral 3), made and run
by mlx-vlm.

Run through make_vlm_golden.py (``--case pixtral``, ``--case mistral3``); the
case folder has the layout that script describes, with these differences:

    pixel_values     [Σ patches, C*P*P] each image's patches row-major
                     (Mistral 3: in merge-window order, as lmspec's processor
                     gives them), each flattened as (channel, row, column);
                     the images
                     have different sizes (mlx-vlm gets them zero-padded to
                     one batch with their image_sizes)
    image_grid_thw   [images, 3] (1, H/P, W/P) per image
    vision_features  [Σ tokens, text hidden] the projector's output (one
                     token per patch; Mistral 3: per 2 x 2 merge window,
                     row-major over the merged grid)
    input_ids        [1, L] the prompt, each image as rows of [IMG] tokens,
                     each row followed by [IMG_BREAK], the last by [IMG_END]
    logits           [1, L, vocab] the prompt with the features spliced in
                     (causal attention; positions are the sequence's)
    greedy_tokens, decode_logits
                     16 greedy steps after the prompt is prefilled into a
                     KV cache
    vision_taps.NAME the tower's values under the node names of
                     specs/models/pixtral_vision.yaml (mistral3_vision.yaml;
                     the rows before the merger in merge-window order)
    processor.safetensors
                     transformers' PixtralImageProcessorPil on the test
                     images: NAME.pixel_values [patches, C*P*P] (patches as
                     above) and NAME.grid [1, 3]
"""

import copy
import json
import os

import numpy as np

import mlx.core as mx
from mlx.utils import tree_flatten

GREEDY = 16
IMG, IMG_BREAK, IMG_END = 250, 251, 252

PIXTRAL_CASES = {
    "pixtral": {
        "model_type": "pixtral",
        "image_token_index": IMG,
        "vision_feature_layer": -1,
        "vocab_size": 256,
        "text_config": {
            "model_type": "mistral",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "vocab_size": 256,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 512,
        },
        "vision_config": {
            "model_type": "pixtral",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "head_dim": 16,
            "patch_size": 4,
            "image_size": 64,
            "num_channels": 3,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
        },
    },
}

PROCESSORS = {
    "pixtral": {
        "image_processor_type": "PixtralImageProcessor",
        "do_resize": True,
        "size": {"longest_edge": 64},
        "patch_size": {"height": 4, "width": 4},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    },
}

# Mistral 3: the same tower and text sizes, a 2 x 2 patch merger and an
# RMSNorm before it, projector linears without bias.
PIXTRAL_CASES["mistral3"] = {
    **copy.deepcopy(PIXTRAL_CASES["pixtral"]),
    "model_type": "mistral3",
    "spatial_merge_size": 2,
    "multimodal_projector_bias": False,
}
# Mistral 3's processor config names the patch; the merge comes from the
# model (Hugging Face's processor aligns each side to patch x merge).
PROCESSORS["mistral3"] = copy.deepcopy(PROCESSORS["pixtral"])

# Two images of different sizes (pixels): a 4 x 6 and a 3 x 3 patch grid;
# Mistral 3: a 4 x 6 and a 6 x 4 grid (2 x 3 and 3 x 2 tokens).
IMAGE_SIZES = {"pixtral": [(16, 24), (12, 12)], "mistral3": [(16, 24), (24, 16)]}


def merge_of(cfg):
    return cfg.get("spatial_merge_size", 1) if cfg["model_type"] == "mistral3" else 1


def build(case, cfg):
    if case == "mistral3":
        from mlx_vlm.models.mistral3 import Model, ModelConfig
        from mlx_vlm.models.mistral3.config import TextConfig, VisionConfig
    else:
        from mlx_vlm.models.pixtral import Model, ModelConfig
        from mlx_vlm.models.pixtral.config import TextConfig, VisionConfig

    cfg = copy.deepcopy(cfg)
    config = ModelConfig.from_dict(cfg)
    config.text_config = TextConfig.from_dict(cfg["text_config"])
    config.vision_config = VisionConfig.from_dict(cfg["vision_config"])
    return Model(config)


def window_order(gh, gw, m):
    """Row-major patch indices of a gh x gw grid in merge-window order."""
    return [(bh * m + ih) * gw + bw * m + iw
            for bh in range(gh // m) for bw in range(gw // m)
            for ih in range(m) for iw in range(m)]


def to_patches(chw, p, m=1):
    """[C, H, W] -> [(H/p) * (W/p), C * p * p], patches row-major (m = 1) or
    in merge-window order."""
    c, h, w = chw.shape
    x = chw.reshape(c, h // p, p, w // p, p).transpose(1, 3, 0, 2, 4)
    x = x.reshape((h // p) * (w // p), c * p * p)
    return x[window_order(h // p, w // p, m)]


def image_tokens(rows, cols):
    ids = []
    for r in range(rows):
        ids += [IMG] * cols + [IMG_BREAK if r < rows - 1 else IMG_END]
    return ids


def prompt(grids, m):
    ids = [1, 5, 6]
    for k, (_, h, w) in enumerate(grids):
        ids += image_tokens(h // m, w // m) + [7 + 2 * k, 8 + 2 * k]
    return ids


def vision_taps(model, nhwc, sizes, m):
    """The tower and projector step by step, under pixtral_vision's (or
    mistral3_vision's) names; the rows before the merger in merge-window
    order."""
    from mlx_vlm.models.pixtral.vision import (
        generate_block_attention_mask,
        position_ids_in_meshgrid,
    )

    vm = model.vision_tower.vision_model
    p = vm.patch_size
    taps = {}
    emb = vm.patch_conv(nhwc)
    parts = [e[: s[0] // p, : s[1] // p] for e, s in zip(emb, sizes)]
    h = mx.concatenate([x.reshape(-1, x.shape[-1]) for x in parts], axis=0)[None]
    taps["patches"] = h
    h = vm.ln_pre(h)
    taps["ln_pre"] = h
    ids = position_ids_in_meshgrid(parts, max_width=vm.config.image_size // p)
    pos = vm.patch_positional_embedding(h, ids)
    mask = generate_block_attention_mask([x.shape[0] * x.shape[1] for x in parts], h)
    for i, layer in enumerate(vm.transformer.layers):
        if i == 0:
            a = layer.attention_norm(h)
            taps[f"layers.{i}.attention_norm"] = a
            taps[f"layers.{i}.q"] = layer.attention.q_proj(a)
            o = layer.attention(a, a, a, pos, mask)
            taps[f"layers.{i}.o"] = o
            taps[f"layers.{i}.h"] = h + o
            f = layer.ffn_norm(h + o)
            taps[f"layers.{i}.ffn_norm"] = f
            taps[f"layers.{i}.down"] = layer.feed_forward(f)
        h = layer(h, mask=mask, position_embeddings=pos)
        taps[f"layers.{i}"] = h
    proj = model.multi_modal_projector
    if m > 1:
        x = proj.norm(h[0])
        taps["norm"] = x[None]
        x = proj.patch_merger(x, mx.array(sizes))
        taps["merging"] = x[None]
        # The tower's rows in lmspec's (merge-window) order.
        order, start = [], 0
        for part in parts:
            gh, gw = part.shape[0], part.shape[1]
            order += [start + i for i in window_order(gh, gw, m)]
            start += gh * gw
        order = mx.array(order)
        for name in list(taps):
            if name not in ("merging",):
                taps[name] = taps[name][:, order]
    else:
        x = h
    x = proj.linear_1(x)
    taps["fc1"] = x
    x = proj.gelu(x)
    taps["act"] = x
    taps["fc2"] = proj.linear_2(x)
    return taps


def write_tokenizer(out):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "user": 3}
    for i in range(4, IMG):
        vocab[f"w{i}"] = i
    specials = {"[IMG]": IMG, "[IMG_BREAK]": IMG_BREAK, "[IMG_END]": IMG_END,
                "[INST]": 253, "[/INST]": 254, "<eos>": 255}
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
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    d = os.path.join(out, "model")
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f, indent=1)
    # The template writes [IMG] per image, as Mistral's; the runtime expands
    # it into the image's rows.
    template = ("{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
                "{% if message['content'] is string %}{{ message['content'] }}"
                "{% else %}{% for c in message['content'] %}"
                "{% if c['type'] == 'image' %}[IMG] "
                "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
                "[/INST] {% else %}{{ message['content'] }} <eos> {% endif %}{% endfor %}")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "eos_token": "<eos>", "bos_token": None,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)


def processor_fixtures(case, out, names, folder):
    from PIL import Image
    from transformers.models.pixtral.image_processing_pil_pixtral import (
        PixtralImageProcessorPil as Processor,
    )

    cfg = PROCESSORS[case]
    with open(os.path.join(out, "model", "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    p = cfg["patch_size"]["height"]
    m = merge_of(PIXTRAL_CASES[case])
    kwargs = {k: v for k, v in cfg.items() if k != "image_processor_type"}
    # Mistral 3's processor aligns each side to patch x merge.
    kwargs["patch_size"] = {"height": p * m, "width": p * m}
    proc = Processor(**kwargs)
    tensors = {}
    for name in names:
        res = proc(images=[Image.open(os.path.join(folder, name))], return_tensors="np")
        pv = np.asarray(res["pixel_values"], np.float32)[0]
        h, w = (int(v) for v in np.asarray(res["image_sizes"])[0])
        assert pv.shape[1:] == (h, w), (pv.shape, h, w)
        tensors[f"{name}.pixel_values"] = mx.array(to_patches(pv, p, m))
        tensors[f"{name}.grid"] = mx.array(np.array([[1, h // p, w // p]], np.int32))
        print(f"{name}: pixel_values {pv.shape}")
    mx.save_safetensors(os.path.join(out, "processor.safetensors"), tensors)


def make_pixtral_case(args, make_images):
    case = args.case
    cfg = PIXTRAL_CASES[case]
    out = args.out or os.path.join("goldens", "vlm", case)
    os.makedirs(os.path.join(out, "model"), exist_ok=True)

    mx.random.seed(args.seed)
    model = build(case, cfg)
    params = dict(tree_flatten(model.parameters()))
    rng = np.random.RandomState(args.seed)
    for name, p in params.items():
        if p.ndim == 1:
            noise = rng.standard_normal(p.shape).astype(np.float32) * 0.1
            params[name] = p + mx.array(noise)
    # Larger text weights than the default init, so that the greedy tokens
    # vary rather than repeat one token.
    for name in list(params):
        if name.startswith("language_model.model.layers") and params[name].ndim == 2:
            params[name] = params[name] * 3.0
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    mx.save_safetensors(os.path.join(out, "model", "model.safetensors"),
                        {k: v.astype(mx.float32) for k, v in params.items()})
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    vc = cfg["vision_config"]
    p, c = vc["patch_size"], vc["num_channels"]
    m = merge_of(cfg)
    sizes = IMAGE_SIZES[case]
    hmax, wmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = [rng.uniform(-1.0, 1.0, (c, h, w)).astype(np.float32) for h, w in sizes]
    padded = np.zeros((len(sizes), c, hmax, wmax), np.float32)
    for k, (img, (h, w)) in enumerate(zip(images, sizes)):
        padded[k, :, :h, :w] = img
    nchw = mx.array(padded)
    pixel_values = mx.array(np.concatenate([to_patches(img, p, m) for img in images]))
    grids = [[1, h // p, w // p] for h, w in sizes]
    image_sizes = mx.array(sizes)
    ids_list = prompt(grids, m)
    ids = mx.array([ids_list], dtype=mx.int32)

    taps = vision_taps(model, nchw.transpose(0, 2, 3, 1), sizes, m)
    mx.eval(taps)
    *_, hidden = model.vision_tower(nchw.transpose(0, 2, 3, 1), output_hidden_states=True,
                                    image_sizes=image_sizes)
    if m > 1:
        features = model.multi_modal_projector(hidden[-1][0], image_sizes)
    else:
        features = model.multi_modal_projector(hidden[-1])
    assert mx.allclose(taps["fc2"].reshape(features.shape), features).item()
    emb = model.get_input_embeddings(ids, nchw, image_sizes=image_sizes).inputs_embeds
    lm = model.language_model
    mx.eval(emb)
    logits = lm(ids, inputs_embeds=emb).logits

    from mlx_vlm.models.cache import KVCache

    cache = [KVCache() for _ in lm.model.layers]
    step = lm(ids, inputs_embeds=emb, cache=cache).logits
    assert mx.allclose(step, logits, atol=1e-4).item()
    out_tokens, decode = [], []
    for _ in range(GREEDY):
        tok = int(mx.argmax(step[0, -1]).item())
        out_tokens.append(tok)
        step = lm(mx.array([[tok]], dtype=mx.int32), cache=cache).logits
        decode.append(step[0, -1])

    golden = {
        "pixel_values": pixel_values,
        "image_grid_thw": mx.array(grids, dtype=mx.int32),
        "input_ids": ids,
        "vision_features": features.reshape(-1, features.shape[-1]).astype(mx.float32),
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
        "grids": grids,
        "image_sizes": [list(s) for s in sizes],
        "greedy_tokens": GREEDY,
        "attention": "text causal; the tower block-diagonal per image",
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    folder = os.path.join(os.path.dirname(out), "images")
    names = make_images(folder)
    processor_fixtures(case, out, names, folder)
    write_tokenizer(out)
    print(f"{out}: {len(ids_list)} prompt tokens, features {features.shape}, "
          f"tokens {out_tokens}")
