#!/usr/bin/env python3
"""The mlx-lm side of `lmspec bench`: load time, prefill and decode speed.

Prints ONE JSON object on stdout; every log line goes to stderr (mlx-lm's
own prints included: stdout is pointed at stderr while the script runs).

Benchmark (the protocol is the same as the Rust side's):

    bench_mlx_lm.py --model PATH --tokens-file FILE --gen-tokens N --repeat K \\
        --weights {quantized,dense}

* PATH is a ``.gguf`` file (a llama GGUF, loaded as smollm2_reference.py
  loads SmolLM2: GGUF names mapped to mlx-lm's, per-layer quantization,
  rope_traditional=True) or an mlx-lm/HF model directory (loaded with
  ``mlx_lm.utils.load_model``).
* FILE holds the prompt as a JSON list of token ids.
* ``load_s``: load, then for ``--weights dense`` replace every QuantizedLinear
  and QuantizedEmbedding by nn.Linear / nn.Embedding holding
  ``mx.dequantize(...).astype(float32)`` (a tied lm_head goes through
  ``embed_tokens.as_linear`` and keeps working), ``mx.eval(model.parameters())``,
  then one forward of the first prompt token with a fresh cache, evaluated.
* Each of the K repeats: ``mx.reset_peak_memory()``, a fresh
  ``make_prompt_cache(model)``, t0; iterate
  ``generate_step(mx.array(prompt), model, max_tokens=N, sampler=argmax,
  prompt_cache=cache)`` (default prefill_step_size). First token (after
  ``int(token)``): t1, ``ttft_s = t1 - t0``, ``prefill_tps = len(prompt) /
  ttft_s``; N-th token: t2, ``decode_tps = (N - 1) / (t2 - t1)``;
  ``peak_memory_mb = mx.get_peak_memory() / 1e6``. The generator is then run
  to its end and the generation stream synchronized (outside the timings),
  so no work of one repeat spills into the next.
* Output: engine, model, weights, device, prompt_tokens, gen_tokens, repeat,
  load_s, ttft_s / prefill_tps / decode_tps as {median, min, max} over the
  repeats (median of an even count = mean of the two middle values),
  peak_memory_mb (max over the repeats), tokens (the first repeat's ids),
  decode_graph (the primitives of one decode step by kind, counted on
  ``mx.export_to_dot``), mlx_version, mlx_lm_version.

Interleaved mode (what ``lmspec bench --against mlx-lm`` runs):

    bench_mlx_lm.py --serve --model PATH --tokens-file FILE --gen-tokens N \
        --weights {quantized,dense}

loads as above and prints the fields that do not depend on repeats as one
JSON line; then each line ``repeat`` on stdin runs one repeat and prints its
ttft_s, prefill_tps, decode_tps, peak_memory_mb and tokens as one JSON line.
The caller alternates these repeats with its own, so both engines meet the
same machine state.

Random model directory (no benchmark):

    bench_mlx_lm.py --make-random-llama OUTDIR --like PATH|llama-1b|llama-8b \\
        [--dtype float32|bfloat16] [--bits 4 --group-size 64] [--seed 0]

writes OUTDIR/config.json + OUTDIR/model.safetensors (mlx-lm names and
format, loadable by ``mlx_lm.utils.load_model``) of a llama with the shape of
PATH (a llama GGUF or a model directory) or of the ``llama-1b`` / ``llama-8b``
preset.
Weights are ``0.02 * N(0, 1)`` drawn after ``mx.random.seed(seed)`` (then cast
to --dtype), RMSNorm weights are 1; with --bits the model is quantized with
mlx-lm's ``quantize_model`` and config.json gets its quantization block.
Prints {"path", "bytes", ...} as JSON on stdout.
"""

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_config, load_model, quantize_model, save_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_reference import build_config, build_model  # noqa: E402

# Shape keys copied from the --like model into the random llama's config.
SHAPE_KEYS = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
]

PRESETS = {
    "llama-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
    # Llama-3-8B's shape (where decoding is bound by memory bandwidth).
    "llama-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
}

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def argmax_sampler(logprobs):
    return mx.argmax(logprobs, axis=-1)


def is_gguf(path):
    return Path(path).is_file() and Path(path).suffix.lower() == ".gguf"


def load_gguf(path):
    """A llama GGUF as an mlx-lm llama model (smollm2_reference's loader)."""
    arrays, metadata = mx.load(str(path), return_metadata=True)
    config, _ = build_config(metadata)
    model, config, _ = build_model(arrays, config)
    return model, config


def load_any(path):
    """(model, config) of a GGUF file or a model directory, possibly lazy."""
    if is_gguf(path):
        return load_gguf(path)
    if not Path(path).is_dir():
        raise SystemExit(f"{path} is neither a .gguf file nor a model directory")
    return load_model(Path(path), lazy=True)


def dequantize_to_float32(model):
    """Replace QuantizedLinear / QuantizedEmbedding by float32 dense layers; returns their count."""
    replacements = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            if "scales" in module:
                raise SystemExit(f"{name}: quantized layer {type(module).__name__} is not supported")
            continue
        weight = mx.dequantize(module.weight, module.scales, module.get("biases"),
                               group_size=module.group_size, bits=module.bits,
                               mode=module.mode).astype(mx.float32)
        rows, cols = weight.shape
        if isinstance(module, nn.QuantizedLinear):
            has_bias = "bias" in module
            dense = nn.Linear(cols, rows, bias=has_bias)
            if has_bias:
                dense.bias = module.bias.astype(mx.float32)
        else:
            dense = nn.Embedding(rows, cols)
        dense.weight = weight
        replacements.append((name, dense))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    return len(replacements)


def vocab_size(model, config):
    if "vocab_size" in config:
        return int(config["vocab_size"])
    return int(model.model.embed_tokens.weight.shape[0])


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def read_tokens(path):
    with open(path) as f:
        tokens = json.load(f)
    if not isinstance(tokens, list) or not tokens or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise SystemExit(f"{path}: expected a non-empty JSON list of token ids")
    return tokens


def decode_graph(model, prompt):
    """Primitives of one decode step as generate_step builds it, by kind.

    The prompt is prefilled into a fresh cache; then one token goes through
    the model and generate_step's own work on the logits (last row,
    log-softmax, the greedy sampler), counted on ``mx.export_to_dot``. Of
    the first two such steps the smaller is reported: the KV cache grows
    every 256 positions, and a step that grows it records more (at most one
    of two neighbouring steps does).
    """
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([prompt]), cache=cache))
    mx.eval([c.state for c in cache])
    best = None
    for _ in range(2):
        logits = model(mx.array([prompt[:1]]), cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        token = argmax_sampler(logprobs)
        dot = io.StringIO()
        mx.export_to_dot(dot, token)
        mx.eval(token, [c.state for c in cache])
        census = {}
        for line in dot.getvalue().splitlines():
            if "shape=rectangle" in line and 'label ="' in line:
                name = line.split('label ="', 1)[1].split('"', 1)[0]
                census[name] = census.get(name, 0) + 1
        step = {"total": sum(census.values()), "by_kind": dict(sorted(census.items()))}
        if best is None or step["total"] < best["total"]:
            best = step
    return best


def load_for_bench(args, prompt):
    """(model, header): the model loaded, materialised and warmed as the
    protocol says, and the report fields that do not depend on repeats."""
    t_load = time.perf_counter()
    model, config = load_any(args.model)
    replaced = dequantize_to_float32(model) if args.weights == "dense" else 0
    mx.eval(model.parameters())
    warm = model(mx.array([prompt[:1]]), cache=make_prompt_cache(model))
    mx.eval(warm)
    load_s = time.perf_counter() - t_load
    del warm
    vocab = vocab_size(model, config)
    if max(prompt) >= vocab or min(prompt) < 0:
        raise SystemExit(f"prompt token ids must lie in [0, {vocab})")
    params = dict(tree_flatten(model.parameters()))
    kinds = {}
    for value in params.values():
        key = str(value.dtype).replace("mlx.core.", "")
        kinds[key] = kinds.get(key, 0) + 1
    log(f"loaded {args.model} ({args.weights}; {replaced} layers dequantized) in {load_s:.3f} s; "
        f"arrays by dtype {kinds}; device {mx.default_device()}")
    graph = decode_graph(model, prompt)
    log(f"decode step: {graph['total']} primitives")
    profile_decode(model, prompt, args.gen_tokens)  # warm-up: kernels, memory pool
    step_us = profile_decode(model, prompt, args.gen_tokens)
    log(f"decode step host time (us): {step_us}")
    header = {
        "engine": "mlx-lm",
        "model": args.model,
        "weights": args.weights,
        "device": str(mx.default_device()),
        "prompt_tokens": len(prompt),
        "gen_tokens": args.gen_tokens,
        "load_s": load_s,
        "decode_graph": graph,
        "decode_step_us": step_us,
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
    }
    return model, header


def one_repeat(model, prompt, gen_tokens):
    """One timed repeat: fresh cache, prefill, greedy decode of gen_tokens."""
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    tokens = []
    t1 = t2 = None
    t0 = time.perf_counter()
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=gen_tokens,
                                  sampler=argmax_sampler, prompt_cache=cache):
        tokens.append(int(token))
        if len(tokens) == 1:
            t1 = time.perf_counter()
        if len(tokens) == gen_tokens:
            t2 = time.perf_counter()
    mx.synchronize(generation_stream)
    mx.synchronize()
    if len(tokens) != gen_tokens:
        raise RuntimeError(f"generate_step gave {len(tokens)} tokens, not {gen_tokens}")
    del cache
    return {
        "ttft_s": t1 - t0,
        "prefill_tps": len(prompt) / (t1 - t0),
        "decode_tps": (gen_tokens - 1) / (t2 - t1),
        "peak_memory_mb": mx.get_peak_memory() / 1e6,
        "tokens": tokens,
    }


def profile_decode(model, prompt, steps):
    """Mean host microseconds per decode step, split as lmspec's generator
    splits them: build (the forward and generate_step's work on the logits),
    launch (``mx.async_eval``) and wait (reading the token back).

    generate_step cannot be timed from outside, so this is a copy of its
    greedy loop (same stream, same one-token-in-flight order), run once
    outside the timed repeats.
    """
    cache = make_prompt_cache(model)
    build = launch = wait = 0.0

    def step(y):
        nonlocal build, launch
        t0 = time.perf_counter()
        logits = model(y[None], cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        token = argmax_sampler(logprobs)
        t1 = time.perf_counter()
        mx.async_eval(token, logprobs)
        build += t1 - t0
        launch += time.perf_counter() - t1
        return token

    with mx.stream(generation_stream):
        if len(prompt) > 1:
            model(mx.array([prompt[:-1]]), cache=cache)
            mx.eval([c.state for c in cache])
        y = step(mx.array(prompt[-1:]))
        for _ in range(steps - 1):
            following = step(y)
            t = time.perf_counter()
            y.item()
            wait += time.perf_counter() - t
            y = following
        y.item()
    mx.synchronize()
    return {"build": build * 1e6 / steps, "launch": launch * 1e6 / steps, "wait": wait * 1e6 / steps}


def check_args(args):
    prompt = read_tokens(args.tokens_file)
    if args.gen_tokens < 2:
        raise SystemExit("--gen-tokens must be at least 2 (decode speed needs two tokens)")
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    return prompt


def bench(args, out):
    prompt = check_args(args)
    model, header = load_for_bench(args, prompt)
    samples = []
    for r in range(args.repeat):
        sample = one_repeat(model, prompt, args.gen_tokens)
        if samples and sample["tokens"] != samples[0]["tokens"]:
            log(f"warning: repeat {r} generated different tokens than repeat 0")
        log(f"repeat {r}: ttft {sample['ttft_s']:.4f} s, prefill {sample['prefill_tps']:.1f} tok/s, "
            f"decode {sample['decode_tps']:.2f} tok/s, peak {sample['peak_memory_mb']:.1f} MB")
        samples.append(sample)
    result = {
        **header,
        "repeat": args.repeat,
        "ttft_s": stats([s["ttft_s"] for s in samples]),
        "prefill_tps": stats([s["prefill_tps"] for s in samples]),
        "decode_tps": stats([s["decode_tps"] for s in samples]),
        "peak_memory_mb": max(s["peak_memory_mb"] for s in samples),
        "tokens": samples[0]["tokens"],
    }
    print(json.dumps(result), file=out, flush=True)


def serve(args, out):
    """Interleaved mode: load once, print the header as one JSON line, then
    answer each ``repeat`` line on stdin with one repeat's JSON line, until
    end of input. The caller alternates these repeats with its own."""
    prompt = check_args(args)
    model, header = load_for_bench(args, prompt)
    print(json.dumps(header), file=out, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "repeat":
            print(json.dumps(one_repeat(model, prompt, args.gen_tokens)), file=out, flush=True)
        elif command:
            raise SystemExit(f"unknown command {command!r} (expected 'repeat')")


def like_config(like):
    """Shape keys of the --like model (a preset name, a llama GGUF or a model directory)."""
    if like in PRESETS:
        return dict(PRESETS[like])
    if is_gguf(like):
        _, metadata = mx.load(str(like), return_metadata=True)
        source, _ = build_config(metadata)
        # GGUF stores floats as float32: 1e-5 comes back as 9.999999747378752e-06.
        source = {k: float(str(np.float32(v))) if isinstance(v, float) else v
                  for k, v in source.items()}
    elif Path(like).is_dir():
        source = load_config(Path(like))
        source = {**source.get("text_config", {}), **source}
        if source.get("model_type") != "llama":
            log(f"note: {like} has model_type {source.get('model_type')!r}; copying its shape into a llama")
    else:
        raise SystemExit(f"--like {like}: not a preset ({', '.join(PRESETS)}), .gguf file or directory")
    shape = {k: source[k] for k in SHAPE_KEYS if k in source}
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if k not in shape]
    if missing:
        raise SystemExit(f"--like {like}: its config lacks {missing}")
    if source.get("rope_scaling"):
        log(f"note: rope_scaling {source['rope_scaling']} of {like} is not copied")
    return shape


def make_random_llama(args, out):
    shape = like_config(args.like)
    config = {
        "model_type": "llama",
        "num_key_value_heads": shape["num_attention_heads"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        **shape,
        "rope_traditional": False,
    }
    if "head_dim" not in config:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    dtype = DTYPES[args.dtype]
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.RMSNorm)}
    mx.random.seed(args.seed)
    new = []
    for name, value in tree_flatten(model.parameters()):
        if name.rpartition(".")[0] in norms:
            array = mx.ones(value.shape, dtype=dtype)
        else:
            array = (0.02 * mx.random.normal(value.shape, dtype=mx.float32)).astype(dtype)
        mx.eval(array)
        new.append((name, array))
    model.update(tree_unflatten(new))
    del new
    if args.bits:
        model, config = quantize_model(model, config, group_size=args.group_size, bits=args.bits)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    out_dir = Path(args.make_random_llama)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(dict(config), out_dir / "config.json")
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    nbytes = sum(f.stat().st_size for f in (out_dir / "config.json", out_dir / "model.safetensors"))
    parameters = sum(v.size for v in weights.values())
    log(f"wrote {out_dir} ({nbytes / 1e6:.1f} MB, {len(weights)} arrays)")
    print(json.dumps({
        "path": str(out_dir),
        "bytes": nbytes,
        "arrays": len(weights),
        "stored_elements": parameters,
        "dtype": args.dtype,
        "quantization": config.get("quantization"),
        "config": {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")},
    }), file=out, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--model", help=".gguf file or mlx-lm/HF model directory")
    parser.add_argument("--tokens-file", help="JSON list of prompt token ids")
    parser.add_argument("--gen-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repeats (default 3)")
    parser.add_argument("--weights", choices=["quantized", "dense"], default="quantized",
                        help="quantized: as stored; dense: quantized layers dequantized to float32")
    parser.add_argument("--serve", action="store_true",
                        help="interleaved mode: one repeat per 'repeat' line on stdin")
    parser.add_argument("--make-random-llama", metavar="OUTDIR",
                        help="write a random llama model directory instead of benchmarking")
    parser.add_argument("--like", help="with --make-random-llama: a .gguf, a model directory, 'llama-1b' or 'llama-8b'")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--bits", type=int, help="quantize the random model to this many bits")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    out = sys.stdout
    sys.stdout = sys.stderr  # mlx-lm prints [INFO] lines; keep stdout for the JSON
    try:
        if args.make_random_llama:
            if not args.like:
                parser.error("--make-random-llama needs --like")
            make_random_llama(args, out)
        else:
            if not args.model or not args.tokens_file:
                parser.error("--model and --tokens-file are required")
            (serve if args.serve else bench)(args, out)
    finally:
        sys.stdout = out


if __name__ == "__main__":
    main(sys.argv[1:])
