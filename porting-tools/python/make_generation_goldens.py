#!/usr/bin/env python3
"""Record mlx-lm's greedy generation of the tiny golden models under KV-cache variants.

Each case runs ``mlx_lm.generate.generate_step`` (argmax sampler) on one of
the tiny models that make_golden.py saved under goldens/, with the 12-token
prompt of that model's golden.safetensors, and records the GEN_TOKENS
tokens it yields. The cases vary what generate_step is given: the prefill
step size, a rotating (windowed) KV cache and a quantized KV cache:

    goldens/generation/
        cases.json   [{"name", "model", "prompt", "params", "cache", "greedy",
                       "first_diff_from_standard", "min_top2_margin",
                       "top2_margins"}]
        meta.json    generator command, versions, checks

The models must exist first (make_golden.py --case llama / --case llama_hd32).

Usage (from the repository root):

    .venv/bin/python porting-tools/python/make_generation_goldens.py [--out goldens/generation]

Note on max_kv_size: in mlx-lm 0.32.2, generate_step builds its cache with
make_prompt_cache(model, max_kv_size), which returns model.make_cache()
whenever the model has one, and mlx-lm's llama Model does (plain KVCache per
layer unless the config has sliding-window layers). max_kv_size alone is
therefore ignored for llama. The rotating cases pass the cache that
make_prompt_cache builds for a model without make_cache,
RotatingKVCache(max_size=max_kv_size, keep=4) per layer, as prompt_cache;
a check records that max_kv_size alone reproduces the standard case.
"""

import argparse
import json
import platform
import re
import shlex
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, generate_step
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.utils import load_model

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "porting-tools/python/make_generation_goldens.py"
PYTHON = ".venv/bin/python"
DEFAULT_OUT = "goldens/generation"

GEN_TOKENS = 32
# What make_prompt_cache uses for a model without make_cache.
ROTATING_KEEP = 4

# generate_step's defaults, written out in every case so the reader needs no
# knowledge of them.
DEFAULT_PARAMS = {
    "max_kv_size": None,
    "prefill_step_size": 2048,
    "kv_bits": None,
    "kv_group_size": 64,
    "quantized_kv_start": DEFAULT_QUANTIZED_KV_START,
}

MODELS = {
    "llama": "goldens/llama/model",
    "llama_hd32": "goldens/llama_hd32/model",
}

# name, model (a MODELS key), generate_step parameters beyond the defaults.
# The first case of each model with no parameters is that model's baseline.
CASES = [
    ("standard", "llama", {}),
    ("chunked", "llama", {"prefill_step_size": 4}),
    ("rotating", "llama", {"max_kv_size": 8}),
    ("rotating_chunked", "llama", {"max_kv_size": 8, "prefill_step_size": 3}),
    # The prompt fits the window; it is exceeded during decoding.
    ("rotating_16", "llama", {"max_kv_size": 16}),
    ("standard_hd32", "llama_hd32", {}),
    ("kv8", "llama_hd32", {"kv_bits": 8, "kv_group_size": 32, "quantized_kv_start": 0}),
    ("kv4_late", "llama_hd32", {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 16}),
]


def argmax_sampler(logprobs):
    return mx.argmax(logprobs, axis=-1)


def describe_cache(cache):
    """A JSON description of one layer's cache object."""
    if isinstance(cache, QuantizedKVCache):
        return {"type": "QuantizedKVCache", "bits": cache.bits,
                "group_size": cache.group_size, "offset": cache.offset}
    if isinstance(cache, RotatingKVCache):
        return {"type": "RotatingKVCache", "max_size": cache.max_size,
                "keep": cache.keep, "offset": cache.offset}
    if isinstance(cache, KVCache):
        return {"type": "KVCache", "offset": cache.offset}
    return {"type": type(cache).__name__}


def same_for_all_layers(caches):
    descriptions = [describe_cache(c) for c in caches]
    if any(d != descriptions[0] for d in descriptions):
        raise RuntimeError(f"layers have different caches: {descriptions}")
    return descriptions[0]


def make_cache(model, params):
    """The prompt cache the case runs with (see the module docstring)."""
    if params["max_kv_size"] is not None:
        return [RotatingKVCache(max_size=params["max_kv_size"], keep=ROTATING_KEEP)
                for _ in model.layers]
    return make_prompt_cache(model)


def quantization_offset(prompt_len, params):
    """Cache offset after whose model call generate_step quantizes the cache.

    generate_step calls maybe_quantize_kv_cache after each prefill chunk
    (the prompt minus its last token, in chunks of prefill_step_size) and
    after each single-step call; the cache is converted at the first of
    these calls whose offset is >= quantized_kv_start. None without kv_bits.
    """
    if params["kv_bits"] is None:
        return None
    offsets = []
    done = 0
    while prompt_len - done > 1:
        done += min(params["prefill_step_size"], prompt_len - 1 - done)
        offsets.append(done)
    offsets += range(prompt_len, prompt_len + GEN_TOKENS + 1)
    for offset in offsets:
        if offset >= params["quantized_kv_start"]:
            return offset
    return None


def run_case(model, prompt, params, prompt_cache=None, **overrides):
    """Greedy tokens, top-2 logprob margins and the cache after the run."""
    if prompt_cache is None and "max_kv_size" not in overrides:
        prompt_cache = make_cache(model, params)
    kwargs = dict(
        max_tokens=GEN_TOKENS,
        sampler=argmax_sampler,
        prefill_step_size=params["prefill_step_size"],
        kv_bits=params["kv_bits"],
        kv_group_size=params["kv_group_size"],
        quantized_kv_start=params["quantized_kv_start"],
        prompt_cache=prompt_cache,
    )
    kwargs.update(overrides)
    tokens, margins = [], []
    for token, logprobs in generate_step(mx.array(prompt), model, **kwargs):
        tokens.append(int(token))
        top2 = np.sort(np.array(logprobs.astype(mx.float32)))[-2:]
        margins.append(float(top2[1] - top2[0]))
    return tokens, margins, prompt_cache


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


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

    models, prompts, baseline_greedy = {}, {}, {}
    for key, rel in MODELS.items():
        model_dir = REPO_ROOT / rel
        models[key], _ = load_model(model_dir)
        golden = mx.load(str(model_dir.parent / "golden.safetensors"))
        prompts[key] = [int(t) for t in np.array(golden["tokens"])]
        baseline_greedy[key] = [int(t) for t in np.array(golden["greedy"])]

    checks = {}
    results = []
    standard = {}
    for name, model_key, given in CASES:
        unknown = set(given) - set(DEFAULT_PARAMS)
        if unknown:
            raise SystemExit(f"{name}: unknown parameters {sorted(unknown)}")
        params = {**DEFAULT_PARAMS, **given}
        model, prompt = models[model_key], prompts[model_key]

        initial = same_for_all_layers(make_cache(model, params))
        greedy, margins, cache = run_case(model, prompt, params)
        again, _, _ = run_case(model, prompt, params)
        if again != greedy:
            raise RuntimeError(f"{name}: two runs gave different tokens")
        final = same_for_all_layers(cache)
        q_offset = quantization_offset(len(prompt), params)
        if params["kv_bits"] is not None:
            if final.get("type") != "QuantizedKVCache" or final.get("bits") != params["kv_bits"]:
                raise RuntimeError(f"{name}: the cache was not quantized: {final}")
        if len(set(greedy)) == 1:
            raise RuntimeError(f"{name}: greedy continuation is a single repeated token")

        if not given:
            standard[model_key] = greedy
            if greedy != baseline_greedy[model_key]:
                raise RuntimeError(f"{name}: differs from {MODELS[model_key]}/../golden.safetensors greedy")
            checks[f"{name} equals goldens/{model_key}/golden.safetensors greedy"] = True
        if params["max_kv_size"] is not None:
            # What generate_step does with max_kv_size alone (no prompt_cache).
            plain, _, _ = run_case(model, prompt, params, prompt_cache=None,
                                   max_kv_size=params["max_kv_size"])
            checks[f"{name}: max_kv_size alone (no prompt_cache) equals "
                   f"the standard case"] = plain == standard[model_key]

        diff = first_difference(greedy, standard[model_key])
        cache_info = {"initial": {k: v for k, v in initial.items() if k != "offset"},
                      "final": final}
        if q_offset is not None:
            cache_info["quantized_after_offset"] = q_offset
            cache_info["first_token_from_quantized_cache"] = max(0, q_offset + 1 - len(prompt))
        results.append({
            "name": name,
            "model": MODELS[model_key],
            "prompt": prompt,
            "params": params,
            "cache": cache_info,
            "greedy": greedy,
            "first_diff_from_standard": diff,
            "min_top2_margin": round(min(margins), 6),
            "top2_margins": [round(m, 4) for m in margins],
        })
        print(f"{name:17s} {model_key:10s} first diff from standard: "
              f"{'none' if diff is None else diff:>4}  min top-2 margin {min(margins):.4f}  "
              f"cache {initial['type']} -> {final['type']}"
              + (f" (quantized after offset {q_offset})" if q_offset is not None else ""))

    out_dir.mkdir(parents=True, exist_ok=True)
    dump_json(results, out_dir / "cases.json")
    parts = [PYTHON, SCRIPT]
    if repo_relative(out_dir) != DEFAULT_OUT:
        parts += ["--out", repo_relative(out_dir)]
    meta = {
        "generator": " ".join(shlex.quote(p) for p in parts),
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "python_version": platform.python_version(),
        "device": str(mx.default_device()),
        "gen_tokens": GEN_TOKENS,
        "sampler": "argmax over generate_step's logprobs",
        "rotating_cache": f"prompt_cache = [RotatingKVCache(max_size=max_kv_size, keep={ROTATING_KEEP})] "
                          "per layer, since make_prompt_cache ignores max_kv_size for models "
                          "with make_cache (llama)",
        "checks": checks,
        "differs_from_standard": {r["name"]: r["first_diff_from_standard"] for r in results
                                  if r["first_diff_from_standard"] is not None},
    }
    with open(out_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    for label, ok in checks.items():
        print(f"check: {label}: {ok}")
    print(f"wrote {repo_relative(out_dir)}/cases.json ({len(results)} cases) and meta.json")


if __name__ == "__main__":
    main(sys.argv[1:])
