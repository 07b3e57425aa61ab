"""Goldens of the SigLIP-tower families (Gemma 3), made and run by mlx-vlm.

Run through make_vlm_golden.py (``--case gemma3``); the case folder has the
layout that script describes, with these differences:

    pixel_values     [images * patches, C*P*P] each image's patches row-major,
                     each flattened as (channel, row, column) (mlx-vlm's
                     [images, C, H, W] cut into patches)
    image_grid_thw   [images, 3] (1, H/P, W/P) per image
    vision_features  [images * tokens, text hidden] the projector's output
    logits           [1, L, vocab] the prompt with the images spliced in;
                     attention is causal and, as in Hugging Face's Gemma 3,
                     bidirectional within each image's run of tokens (the
                     mask given to mlx-vlm's language model, whose own
                     generation path masks causally)
    greedy_tokens, decode_logits
                     16 greedy steps after the prompt is prefilled into
                     mlx-vlm's caches (rotating for the sliding layers; the
                     window is shorter than prompt + 16)
    vision_taps.NAME the tower's values under the node names of
                     specs/models/gemma3_vision.yaml
    processor.safetensors
                     transformers' Gemma3ImageProcessorPil on the test
                     images: NAME.pixel_values [patches, C*P*P] (patches as
                     above) and NAME.grid [1, 3]

Idefics3 / SmolVLM (--case idefics3, --case smolvlm, run with --seed 2): the
logits are causal (mlx-vlm's own mask), vision_taps add "shuffled" (the
connector's pixel shuffle) before "proj", and the processor fixtures come
from Idefics3ImageProcessorPil / SmolVLMImageProcessorPil without splitting.
"""

import json
import os

import numpy as np

import mlx.core as mx
from mlx.utils import tree_flatten

GREEDY = 16
IMAGES = 2
# The tiny vocabulary's "\n\n".
NEWLINES = 249

SIGLIP_CASES = {
    "gemma3": {
        "model_type": "gemma3",
        "vocab_size": 256,
        "image_token_index": 250,
        "boi_token_index": 251,
        "eoi_token_index": 252,
        "pad_token_id": 0,
        "mm_tokens_per_image": 16,
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-6,
            "vocab_size": 256,
            "query_pre_attn_scalar": 16,
            "sliding_window": 48,
            "sliding_window_pattern": 2,
            "rope_local_base_freq": 10000.0,
            "mm_tokens_per_image": 16,
            "max_position_embeddings": 512,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "patch_size": 4,
            "image_size": 32,
            "num_channels": 3,
            "layer_norm_eps": 1e-6,
        },
    },
}

# PaliGemma: gemma text, one 32 x 32 image (8 x 8 patches, 64 tokens; mlx-vlm's
# PaliGemma tower keeps the first image of a batch only), the projector a
# linear map; the whole prompt attends bidirectionally (mlx-vlm's default
# use_bidirectional_attention), decoding is causal.
SIGLIP_CASES["paligemma"] = {
    "model_type": "paligemma",
    "vocab_size": 256,
    "image_token_index": 250,
    "pad_token_id": 0,
    "projection_dim": 64,
    "text_config": {
        "model_type": "gemma",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 256,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "patch_size": 4,
        "image_size": 32,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
        "projection_dim": 64,
    },
}

# PaliGemma 2: the same with gemma2 text (sandwich norms, query_pre_attn_scalar,
# capped scores and logits).
SIGLIP_CASES["paligemma2"] = {
    **SIGLIP_CASES["paligemma"],
    "text_config": {
        **SIGLIP_CASES["paligemma"]["text_config"],
        "model_type": "gemma2",
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
}

PROCESSORS = {
    "gemma3": {
        "image_processor_type": "Gemma3ImageProcessor",
        "do_resize": True,
        "size": {"height": 32, "width": 32},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "do_pan_and_scan": False,
    },
}


PROCESSORS["paligemma"] = {
    "image_processor_type": "SiglipImageProcessor",
    "do_resize": True,
    "size": {"height": 32, "width": 32},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

PROCESSORS["paligemma2"] = PROCESSORS["paligemma"]

# Idefics3 / SmolVLM: the SigLIP tower (mlx-vlm's names vision_model.*), the
# connector's pixel shuffle (scale_factor 2: 8 x 8 patches to 16 tokens)
# and bias-free linear, the llama text model (causal attention throughout).
# Each image is <fake_token_around_image><global-img>, its tokens,
# <fake_token_around_image> (Hugging Face's processor without splitting).
SIGLIP_CASES["idefics3"] = {
    "model_type": "idefics3",
    "vocab_size": 256,
    "image_token_id": 250,
    "scale_factor": 2,
    "pad_token_id": 0,
    "text_config": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 256,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "idefics3_vision",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "patch_size": 4,
        "image_size": 32,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
    },
}

# SmolVLM: the same model under its own types (mlx-vlm's smolvlm module, the
# tower's model_type smolvlm_vision), with SmolVLM's scale_factor 4 (8 x 8
# patches to 4 tokens).
SIGLIP_CASES["smolvlm"] = {
    **SIGLIP_CASES["idefics3"],
    "model_type": "smolvlm",
    "scale_factor": 4,
    "vision_config": {**SIGLIP_CASES["idefics3"]["vision_config"], "model_type": "smolvlm_vision"},
}
IDEFICS3 = ("idefics3", "smolvlm")

# The longest edge first brought to size.longest_edge (up or down, keeping
# the aspect ratio), then the image squared to max_image_size; Lanczos.
PROCESSORS["idefics3"] = {
    "image_processor_type": "Idefics3ImageProcessor",
    "do_resize": True,
    "size": {"longest_edge": 48},
    "max_image_size": {"longest_edge": 32},
    "resample": 1,
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
    "do_image_splitting": False,
    "do_pad": True,
}
PROCESSORS["smolvlm"] = {**PROCESSORS["idefics3"], "image_processor_type": "SmolVLMImageProcessor",
                          "size": {"longest_edge": 96}}


def build(case, cfg):
    if case in IDEFICS3:
        import copy
        import importlib

        module = importlib.import_module(f"mlx_vlm.models.{case}")
        config = importlib.import_module(f"mlx_vlm.models.{case}.config")
        Model, ModelConfig = module.Model, config.ModelConfig
        TextConfig, VisionConfig = config.TextConfig, config.VisionConfig

        c = copy.deepcopy(cfg)
        c["text_config"] = TextConfig.from_dict(c["text_config"])
        c["vision_config"] = VisionConfig.from_dict(c["vision_config"])
        return Model(ModelConfig.from_dict(c))
    if case in ("paligemma", "paligemma2"):
        import copy

        from mlx_vlm.models.paligemma import Model, ModelConfig

        config = ModelConfig.from_dict(copy.deepcopy(cfg))
        assert config.text_config.use_bidirectional_attention
        return Model(config)
    from mlx_vlm.models.gemma3 import Model, ModelConfig
    from mlx_vlm.models.gemma3.config import TextConfig, VisionConfig

    import inspect

    known = inspect.signature(ModelConfig).parameters
    top = {k: v for k, v in cfg.items()
           if k in known and k not in ("text_config", "vision_config")}
    config = ModelConfig(
        text_config=TextConfig.from_dict(cfg["text_config"]),
        vision_config=VisionConfig.from_dict(cfg["vision_config"]),
        **top,
    )
    return Model(config)


def to_patches(images, p):
    """[B, C, H, W] -> [B * (H/p) * (W/p), C * p * p], patches row-major."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b * (h // p) * (w // p), c * p * p)


def vision_taps(model, nchw):
    """The tower and projector step by step, under gemma3_vision's names."""
    if hasattr(model, "connector"):
        vm = model.vision_model
        proj = model.connector.modality_projection
        shuffle = model.connector
    else:
        vm = model.vision_tower.vision_model
        proj = model.multi_modal_projector
        shuffle = None
    taps = {}
    x = nchw.transpose(0, 2, 3, 1)
    emb = vm.embeddings.patch_embedding(x)
    emb = mx.flatten(emb, start_axis=1, end_axis=2)
    taps["patches"] = emb
    h = emb + vm.embeddings.position_embedding(mx.arange(emb.shape[1])[None])
    taps["embed"] = h
    for i, layer in enumerate(vm.encoder.layers):
        if i > 0:
            # The first block node by node; the rest by their outputs.
            h = layer(h)
            taps[f"layers.{i}"] = h
            continue
        ln1 = layer.layer_norm1(h)
        taps[f"layers.{i}.ln1"] = ln1
        taps[f"layers.{i}.q"] = layer.self_attn.q_proj(ln1)
        o = layer.self_attn(ln1)
        taps[f"layers.{i}.o"] = o
        taps[f"layers.{i}.h"] = h + o
        ln2 = layer.layer_norm2(h + o)
        taps[f"layers.{i}.ln2"] = ln2
        fc1 = layer.mlp.fc1(ln2)
        taps[f"layers.{i}.fc1"] = fc1
        taps[f"layers.{i}.act"] = layer.mlp.activation_fn(fc1)
        taps[f"layers.{i}.fc2"] = layer.mlp(ln2)
        h = layer(h)
        taps[f"layers.{i}"] = h
    h = vm.post_layernorm(h)
    taps["post_ln"] = h
    if shuffle is not None:
        h = shuffle.pixel_shuffle(h, shuffle.scale_factor)
        taps["shuffled"] = h
    taps["proj"] = proj(h)
    return taps


def images_for(case):
    return 1 if case.startswith("paligemma") else IMAGES


def prompt(cfg, tokens):
    if cfg["model_type"] in IDEFICS3:
        # <fake_token_around_image><global-img> image tokens <fake_token_around_image>.
        image, fake, glob = cfg["image_token_id"], 251, 252
        ids = [5, 6]
        for k in range(IMAGES):
            ids += [fake, glob] + [image] * tokens + [fake] + [7 + 2 * k, 8 + 2 * k]
        return ids
    if cfg["model_type"] == "paligemma":
        # Image tokens, bos, the prompt, the separator (PaliGemma's format).
        return [cfg["image_token_index"]] * tokens + [2, 5, 6, 7, 10]
    # Each image as Hugging Face's processor expands <start_of_image>: a
    # blank line (token 249 here), boi, the image tokens, eoi, a blank line.
    boi, eoi, image = cfg["boi_token_index"], cfg["eoi_token_index"], cfg["image_token_index"]
    ids = [5, 6]
    for k in range(IMAGES):
        ids += [NEWLINES, boi] + [image] * tokens + [eoi, NEWLINES] + [7 + 2 * k, 8 + 2 * k]
    return ids


def span_mask(ids, image):
    """Causal, and bidirectional within each run of image tokens."""
    n = len(ids)
    group, run = [], -1
    for k, t in enumerate(ids):
        if t == image:
            if k == 0 or ids[k - 1] != image:
                run += 1
            group.append(run)
        else:
            group.append(-1)
    g = np.array(group)
    causal = np.tril(np.ones((n, n), dtype=bool))
    same = (g[:, None] == g[None, :]) & (g[:, None] >= 0)
    return mx.array(causal | same)


def write_tokenizer(out, cfg):
    vocab = {"<pad>": 0, "<bos>": 2, "user": 3, "model": 1}
    for i in range(4, NEWLINES):
        vocab[f"w{i}"] = i
    if cfg["model_type"] in IDEFICS3:
        specials = {"\n\n": NEWLINES, "<image>": cfg["image_token_id"],
                    "<fake_token_around_image>": 251, "<global-img>": 252,
                    "<start_of_turn>": 253, "<end_of_turn>": 254, "<eos>": 255}
    else:
        specials = {"\n\n": NEWLINES, "<image_soft_token>": cfg["image_token_index"],
                    "<start_of_image>": cfg.get("boi_token_index", 251),
                    "<end_of_image>": cfg.get("eoi_token_index", 252),
                    "<start_of_turn>": 253, "<end_of_turn>": 254, "<eos>": 255}
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
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"},
    }
    d = os.path.join(out, "model")
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f, indent=1)
    # Gemma 3's template writes <start_of_image> per image (the runtime
    # expands it); PaliGemma's here the image token itself.
    image = {"paligemma": "<image_soft_token>", "idefics3": "<image>", "smolvlm": "<image>"}.get(
        cfg["model_type"], "<start_of_image>")
    template = ("{% for message in messages %}<start_of_turn>{{ message['role'] }} "
                "{% if message['content'] is string %}{{ message['content'] }}"
                "{% else %}{% for c in message['content'] %}"
                "{% if c['type'] == 'image' %}" + image + " "
                "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
                "<end_of_turn> {% endfor %}{% if add_generation_prompt %}<start_of_turn>model {% endif %}")
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": template, "eos_token": "<end_of_turn>", "bos_token": None,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=1)


def processor_fixtures(case, out, names, folder):
    from PIL import Image

    if case == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as Processor,
        )
    elif case == "smolvlm":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil as Processor,
        )
    elif case in ("paligemma", "paligemma2"):
        from transformers.models.siglip.image_processing_pil_siglip import (
            SiglipImageProcessorPil as Processor,
        )
    else:
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil as Processor,
        )

    cfg = PROCESSORS[case]
    with open(os.path.join(out, "model", "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    p = SIGLIP_CASES[case]["vision_config"]["patch_size"]
    kwargs = {k: v for k, v in cfg.items() if k != "image_processor_type"}
    proc = Processor(**kwargs)
    tensors = {}
    for name in names:
        res = proc(images=[Image.open(os.path.join(folder, name))], return_tensors="np")
        pv = np.asarray(res["pixel_values"], np.float32)
        if pv.ndim == 5:
            # Idefics3's [batch, images, C, H, W]: one image.
            assert pv.shape[:2] == (1, 1), pv.shape
            pv = pv[0]
        _, _, h, w = pv.shape
        tensors[f"{name}.pixel_values"] = mx.array(to_patches(pv, p))
        tensors[f"{name}.grid"] = mx.array(np.array([[1, h // p, w // p]], np.int32))
        print(f"{name}: pixel_values {pv.shape}")
    mx.save_safetensors(os.path.join(out, "processor.safetensors"), tensors)


def make_siglip_case(args, make_images):
    case = args.case
    cfg = SIGLIP_CASES[case]
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
    if case.startswith("paligemma"):
        # A small tied table, so that the layers rather than the embedding of
        # the last token pick the next one (the greedy tokens vary).
        name = "language_model.model.embed_tokens.weight"
        params[name] = params[name] * 0.05
    # Gemma 3's projection starts at ones: random, scaled like a linear layer.
    name = "multi_modal_projector.mm_input_projection_weight"
    if name in params:
        shape = params[name].shape
        params[name] = mx.array(rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(shape[0]))
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    mx.save_safetensors(os.path.join(out, "model", "model.safetensors"),
                        {k: v.astype(mx.float32) for k, v in params.items()})
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    vc = cfg["vision_config"]
    p, size, c = vc["patch_size"], vc["image_size"], vc["num_channels"]
    n_img = images_for(case)
    nchw = mx.array(rng.uniform(-1.0, 1.0, (n_img, c, size, size)).astype(np.float32))
    pixel_values = mx.array(to_patches(np.array(nchw), p))
    side = size // p
    grid = mx.array([[1, side, side]] * n_img, dtype=mx.int32)
    tokens = cfg.get("mm_tokens_per_image", side * side // cfg.get("scale_factor", 1) ** 2)
    ids_list = prompt(cfg, tokens)
    ids = mx.array([ids_list], dtype=mx.int32)
    # PaliGemma: no mask (mlx-vlm's bidirectional prompt); Gemma 3: the spans.
    causal_only = case in IDEFICS3
    if case.startswith("paligemma") or causal_only:
        mask = None
    else:
        mask = span_mask(ids_list, cfg["image_token_index"])

    taps = vision_taps(model, nchw)
    mx.eval(taps)
    if causal_only:
        hidden, _, _ = model.vision_model(nchw.transpose(0, 2, 3, 1), output_hidden_states=True)
        features = model.connector(hidden)
        # [batch, images, C, H, W]
        emb = model.get_input_embeddings(ids, nchw[None]).inputs_embeds
        # Its own path (position ids from the patch mask) splices the same rows.
        at = mx.array(np.where(np.array(ids_list) == cfg["image_token_id"])[0])
        spliced = emb[0][at]
        assert mx.allclose(spliced, features.reshape(-1, features.shape[-1]), atol=1e-5).item()
    else:
        hidden, _, _ = model.vision_tower(nchw.transpose(0, 2, 3, 1), output_hidden_states=True)
        features = model.multi_modal_projector(hidden)
        emb = model.get_input_embeddings(ids, nchw, mask=mx.ones(ids.shape)).inputs_embeds
    assert mx.allclose(taps["proj"], features).item()
    lm = model.language_model
    mx.eval(emb)
    # mlx-vlm's text model scales its inputs_embeds in place: each call gets
    # a copy.
    logits = lm(ids, inputs_embeds=mx.array(emb), mask=mask).logits

    if hasattr(lm, "make_cache"):
        cache = lm.make_cache()
    else:
        from mlx_vlm.models.cache import KVCache

        cache = [KVCache() for _ in getattr(lm, "model", lm).layers]
    step = lm(ids, inputs_embeds=mx.array(emb), mask=mask, cache=cache).logits
    assert mx.allclose(step, logits, atol=1e-4).item()
    out_tokens, decode = [], []
    for _ in range(GREEDY):
        tok = int(mx.argmax(step[0, -1]).item())
        out_tokens.append(tok)
        step = lm(mx.array([[tok]], dtype=mx.int32), cache=cache).logits
        decode.append(step[0, -1])

    # The causal logits (mlx-vlm's generation path) differ: the span mask
    # matters in this golden.
    n = len(ids_list)
    causal_mask = mx.array(np.tril(np.ones((n, n), dtype=bool)))
    causal = lm(ids, inputs_embeds=mx.array(emb), mask=causal_mask).logits
    gap = float(mx.max(mx.abs(causal - logits)).item())
    assert causal_only or gap > 1e-3, gap

    golden = {
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
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
        "grids": [[1, side, side]] * n_img,
        "greedy_tokens": GREEDY,
        "attention": ("the prompt bidirectional, decoding causal" if case.startswith("paligemma")
                      else "causal" if causal_only
                      else "causal, bidirectional within each image's tokens"),
        "causal_logits_gap": gap,
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    folder = os.path.join(os.path.dirname(out), "images")
    names = make_images(folder)
    processor_fixtures(case, out, names, folder)
    write_tokenizer(out, cfg)
    print(f"{out}: {len(ids_list)} prompt tokens, features {features.shape}, "
          f"tokens {out_tokens}, causal gap {gap:.3e}")
