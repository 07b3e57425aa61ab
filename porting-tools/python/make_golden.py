#!/usr/bin/env python3
"""Generate golden reference outputs for lmspec from mlx-lm.

Each golden case is a tiny, randomly initialised float32 model built with
mlx-lm (optionally quantized), saved the way mlx-lm saves a converted model,
together with reference outputs computed by mlx-lm itself:

    goldens/NAME/
        model/config.json          mlx-lm style config ("model_type", ...,
                                   "quantization" block when quantized)
        model/model.safetensors    parameters under mlx-lm's names
                                   (tree_flatten(model.parameters()))
        golden.safetensors         tokens                int32 [P]
                                   logits                float32 [P, V]
                                   prefill_decode_logits float32 [P, V]
                                   greedy                int32 [G]
        meta.json                  provenance and generation settings

where P = PROMPT_LEN, V = vocab_size and G = GREEDY_TOKENS.

* ``logits``: one forward pass over the whole prompt, without a cache.
* ``prefill_decode_logits``: the same positions computed with a fresh KV
  cache (``make_prompt_cache``): the first PREFILL_SPLIT tokens in one
  forward, then the remaining tokens one at a time.
* ``greedy``: GREEDY_TOKENS tokens produced by ``mlx_lm.generate.generate_step``
  with an argmax sampler (it prefills all but the last prompt token, then
  feeds the last prompt token and each generated token one at a time).

Usage (from the repository root):

    .venv/bin/python porting-tools/python/make_golden.py --all
    .venv/bin/python porting-tools/python/make_golden.py --case llama
    .venv/bin/python porting-tools/python/make_golden.py --case NAME \\
        --model-type TYPE --config-json '{...}' \\
        [--quantize BITS --group-size G [--quant-overrides '{...}']] \\
        [--seed 0] --out goldens/NAME

``--case NAME`` alone regenerates the case from the CASES table below.
"""

import argparse
import copy
import json
import shlex
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_model, quantize_model, save_config

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "porting-tools/python/make_golden.py"
PYTHON = ".venv/bin/python"

PROMPT_LEN = 12
PREFILL_SPLIT = 8
GREEDY_TOKENS = 32

# Scales of the random initialisation: large enough that the logits are far
# from uniform and the norm weights have a visible effect.
WEIGHT_STD = 0.15
BIAS_STD = 0.1
NORM_STD = 0.1

BASE_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

# Extra keys a model type requires beyond BASE_CONFIG.
TYPE_DEFAULTS = {
    "llama": {"rope_traditional": False},
    "mistral": {"rope_traditional": False},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
}

CASES = [
    {"name": "llama", "model_type": "llama", "config": {}},
    {
        "name": "llama_rope_llama3",
        "model_type": "llama",
        "config": {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "tie_word_embeddings": True,
        },
    },
    {"name": "mistral", "model_type": "mistral", "config": {"rope_theta": 1000000.0}},
    {"name": "qwen2", "model_type": "qwen2", "config": {"tie_word_embeddings": True}},
    {
        "name": "qwen3",
        "model_type": "qwen3",
        "config": {"head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2},
    },
    {
        "name": "llama_q4",
        "model_type": "llama",
        "config": {},
        "quantize": {
            "bits": 4,
            "group_size": 32,
            "overrides": {
                "lm_head": {"group_size": 32, "bits": 8},
                "model.layers.1.mlp.down_proj": False,
            },
        },
    },
    {
        "name": "llama_yarn",
        "model_type": "llama",
        "config": {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
                "beta_fast": 32,
                "beta_slow": 1,
            }
        },
    },
    {
        "name": "llama_linear_rope",
        "model_type": "llama",
        "config": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    },
]


def build_config(model_type, overrides):
    """Merge the base config, the type's defaults and the case overrides."""
    config = {"model_type": model_type}
    config.update(copy.deepcopy(BASE_CONFIG))
    config.update(copy.deepcopy(TYPE_DEFAULTS.get(model_type, {})))
    config.update(copy.deepcopy(overrides))
    return config


def randomize_parameters(model, seed):
    """Re-initialise every parameter from a seeded normal distribution.

    Norm weights become 1 + NORM_STD * N(0, 1), biases BIAS_STD * N(0, 1) and
    all other weights WEIGHT_STD * N(0, 1), all float32.
    """
    mx.random.seed(seed)
    new_params = []
    for name, value in tree_flatten(model.parameters()):
        module_name, _, leaf = name.rpartition(".")
        noise = mx.random.normal(value.shape, dtype=mx.float32)
        if module_name.split(".")[-1].endswith("norm"):
            new_value = 1.0 + NORM_STD * noise
        elif leaf == "bias":
            new_value = BIAS_STD * noise
        else:
            new_value = WEIGHT_STD * noise
        new_params.append((name, new_value))
    model.update(tree_unflatten(new_params))
    mx.eval(model.parameters())


def quantize(model, config, bits, group_size, overrides):
    """Quantize like mlx-lm's convert, with optional per-layer overrides.

    ``overrides`` maps a module path to either a dict of quantization
    parameters or False (keep the layer in float). mlx-lm's quantize_model
    only quantizes modules with ``to_quantized`` whose last weight dimension
    is divisible by the group size, and records dict results per layer; the
    False entries are recorded here so the loader sees them explicitly.
    """

    def predicate(path, module):
        if path in overrides:
            return copy.deepcopy(overrides[path])
        return True

    model, config = quantize_model(
        model, config, group_size=group_size, bits=bits, quant_predicate=predicate
    )
    for path, value in overrides.items():
        if value is False:
            config["quantization"][path] = False
    config["quantization_config"] = config["quantization"]
    mx.eval(model.parameters())
    return model, config


def forward_logits(model, tokens):
    """Logits of a single cache-free forward pass, shape [L, V]."""
    logits = model(mx.array(tokens)[None])[0]
    return np.array(logits.astype(mx.float32))


def prefill_decode_logits(model, tokens, split):
    """Logits from a KV-cached prefill of tokens[:split] then 1-token steps."""
    cache = make_prompt_cache(model)
    outputs = [model(mx.array(tokens[:split])[None], cache=cache)[0]]
    for token in tokens[split:]:
        outputs.append(model(mx.array([[int(token)]]), cache=cache)[0])
    logits = mx.concatenate(outputs, axis=0).astype(mx.float32)
    return np.array(logits)


def greedy_tokens(model, tokens, count):
    """Greedy continuation with mlx-lm's generate_step and an argmax sampler."""

    def argmax_sampler(logprobs):
        return mx.argmax(logprobs, axis=-1)

    generated = []
    for token, _ in generate_step(
        mx.array(tokens), model, max_tokens=count, sampler=argmax_sampler
    ):
        generated.append(int(token))
    return np.array(generated, dtype=np.int32)


def generator_command(name, model_type, overrides, seed, quant, out_rel):
    """The exact command line that regenerates one case."""
    parts = [
        PYTHON,
        SCRIPT,
        "--case",
        name,
        "--model-type",
        model_type,
        "--config-json",
        json.dumps(overrides),
    ]
    if quant is not None:
        parts += ["--quantize", str(quant["bits"]), "--group-size", str(quant["group_size"])]
        if quant.get("overrides"):
            parts += ["--quant-overrides", json.dumps(quant["overrides"])]
    parts += ["--seed", str(seed), "--out", out_rel]
    return " ".join(shlex.quote(p) for p in parts)


def directory_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def make_case(name, model_type, overrides, seed, quant, out_dir):
    """Build, save, verify and record one golden case. Returns a summary."""
    out_dir = Path(out_dir)
    model_dir = out_dir / "model"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model_dir.mkdir(parents=True)

    config = build_config(model_type, overrides)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.float32)
    randomize_parameters(model, seed)

    if quant is not None:
        model, config = quantize(
            model, config, quant["bits"], quant["group_size"], quant.get("overrides", {})
        )

    # Save as a converted mlx-lm model directory.
    save_config(copy.deepcopy(config), model_dir / "config.json")
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(
        str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"}
    )

    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, config["vocab_size"], size=PROMPT_LEN).astype(np.int32)

    logits = forward_logits(model, tokens)
    pd_logits = prefill_decode_logits(model, tokens, PREFILL_SPLIT)
    greedy = greedy_tokens(model, tokens, GREEDY_TOKENS)

    # The saved directory must load back in mlx-lm to the identical model.
    reloaded, _ = load_model(model_dir)
    reloaded_weights = dict(tree_flatten(reloaded.parameters()))
    if sorted(reloaded_weights) != sorted(weights):
        raise RuntimeError(f"{name}: reloaded parameter names differ")
    for key, value in weights.items():
        if not np.array_equal(np.array(value), np.array(reloaded_weights[key])):
            raise RuntimeError(f"{name}: reloaded parameter {key} differs")
    if not np.array_equal(forward_logits(reloaded, tokens), logits):
        raise RuntimeError(f"{name}: reloaded model gives different logits")

    if len(set(greedy.tolist())) == 1:
        raise RuntimeError(f"{name}: greedy continuation is a single repeated token")

    # How close each greedy choice was to a tie: a small margin means another
    # implementation may legitimately pick a different token.
    replay = forward_logits(model, np.concatenate([tokens, greedy[:-1]]))[PROMPT_LEN - 1 :]
    top2 = np.sort(replay, axis=-1)[:, -2:]
    greedy_margin = float(np.min(top2[:, 1] - top2[:, 0]))
    if not np.array_equal(np.argmax(replay, axis=-1), greedy):
        print(f"warning: {name}: cached greedy differs from an uncached replay")

    mx.save_safetensors(
        str(out_dir / "golden.safetensors"),
        {
            "tokens": mx.array(tokens, dtype=mx.int32),
            "logits": mx.array(logits, dtype=mx.float32),
            "prefill_decode_logits": mx.array(pd_logits, dtype=mx.float32),
            "greedy": mx.array(greedy, dtype=mx.int32),
        },
    )

    try:
        out_rel = str(out_dir.resolve().relative_to(REPO_ROOT))
    except ValueError:
        out_rel = str(out_dir)
    meta = {
        "case": name,
        "model_type": model_type,
        "generator": generator_command(name, model_type, overrides, seed, quant, out_rel),
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "seed": seed,
        "dtype": "float32",
        "quantization": config.get("quantization"),
        "prompt_len": PROMPT_LEN,
        "prefill_split": PREFILL_SPLIT,
        "greedy_tokens": GREEDY_TOKENS,
    }
    with open(out_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    summary = {
        "case": name,
        "bytes": directory_size(out_dir),
        "max_abs_prefill_decode_vs_logits": float(np.max(np.abs(pd_logits - logits))),
        "logits_std": float(np.std(logits)),
        "distinct_greedy": len(set(greedy.tolist())),
        "greedy_margin": greedy_margin,
        "greedy": greedy.tolist(),
    }
    print(
        f"{name}: {summary['bytes']} bytes, "
        f"max|prefill_decode - logits| = {summary['max_abs_prefill_decode_vs_logits']:.3g}, "
        f"logits std = {summary['logits_std']:.3f}, "
        f"{summary['distinct_greedy']} distinct greedy tokens, "
        f"min greedy top-2 margin = {summary['greedy_margin']:.4f}"
    )
    return summary


def find_case(name):
    for case in CASES:
        if case["name"] == name:
            return case
    raise SystemExit(f"unknown case {name!r}; known: {[c['name'] for c in CASES]}")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--all", action="store_true", help="regenerate every case in CASES")
    parser.add_argument("--case", help="case name")
    parser.add_argument("--model-type", help="mlx-lm model_type (omit to use the CASES entry)")
    parser.add_argument("--config-json", default="{}", help="config overrides as JSON")
    parser.add_argument("--quantize", type=int, metavar="BITS", help="quantize with BITS bits")
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size")
    parser.add_argument(
        "--quant-overrides",
        default="{}",
        help="per-layer quantization as JSON: {path: {group_size, bits} | false}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output directory (default goldens/CASE)")
    parser.add_argument(
        "--goldens-dir",
        default=str(REPO_ROOT / "goldens"),
        help="root directory for --all and default --out",
    )
    args = parser.parse_args(argv)
    if not args.all and not args.case:
        parser.error("either --all or --case is required")
    return args


def main(argv=None):
    args = parse_args(argv)
    mx.set_default_device(mx.cpu)
    goldens_dir = Path(args.goldens_dir)

    if args.all:
        summaries = [
            make_case(
                case["name"],
                case["model_type"],
                case["config"],
                args.seed,
                case.get("quantize"),
                goldens_dir / case["name"],
            )
            for case in CASES
        ]
        total = sum(s["bytes"] for s in summaries)
        print(f"{len(summaries)} cases, {total} bytes in total")
        return

    out_dir = Path(args.out) if args.out else goldens_dir / args.case
    if args.model_type is None:
        case = find_case(args.case)
        make_case(
            case["name"],
            case["model_type"],
            case["config"],
            args.seed,
            case.get("quantize"),
            out_dir,
        )
        return

    quant = None
    if args.quantize is not None:
        quant = {
            "bits": args.quantize,
            "group_size": args.group_size,
            "overrides": json.loads(args.quant_overrides),
        }
    make_case(
        args.case,
        args.model_type,
        json.loads(args.config_json),
        args.seed,
        quant,
        out_dir,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
