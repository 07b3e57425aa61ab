#!/usr/bin/env python3
"""Generate golden reference outputs for lmspec from mlx-lm.

A golden case is either a tiny, randomly initialised float32 model built with
mlx-lm (optionally quantized), saved the way mlx-lm saves a converted model,
or an existing model directory that mlx-lm can load (``--model-dir``),
together with reference outputs computed by mlx-lm itself:

    goldens/NAME/
        model/config.json          mlx-lm style config ("model_type", ...,
                                   "quantization" block when quantized)
        model/model.safetensors    parameters under mlx-lm's names
                                   (tree_flatten(model.parameters()))
                                   (model/ only for generated cases)
        golden.safetensors         tokens                int32 [P]
                                   logits                float32 [P, V]
                                   prefill_decode_logits float32 [P, V]
                                   greedy                int32 [G]
                                   tap.NAME              float32 [1, ...]
        meta.json                  provenance, generation settings, tap list

where P = PROMPT_LEN (or the length of --prompt-tokens), V = vocab_size and
G = GREEDY_TOKENS.

* ``logits``: one forward pass over the whole prompt, without a cache.
* ``tap.NAME``: intermediate values of that same forward, captured from
  mlx-lm's modules and named like the engine's taps (``layers.0.attn.q``,
  ...); see the TAPS table below and README.md. ``tap.logits`` repeats
  ``logits`` with its batch axis.
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
        [--seed 0] [--prompt-tokens 1,2,3] --out goldens/NAME
    .venv/bin/python porting-tools/python/make_golden.py --case NAME \\
        --model-dir DIR [--prompt-tokens 1,2,3] [--out DIR2]

``--case NAME`` alone regenerates the case from the CASES table below.
``--compare-to DIR`` checks, after writing, that every non-tap entry of each
case equals the one in DIR/CASE (a copy of goldens/ taken before).
"""

import argparse
import copy
import json
import shlex
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load_config, load_model, quantize_model, save_config

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "porting-tools/python/make_golden.py"
PYTHON = ".venv/bin/python"

PROMPT_LEN = 12
PREFILL_SPLIT = 8
GREEDY_TOKENS = 32

# Size budget of a generated case directory (model/ included): over it the
# per-head ("detail") taps are left out.
MAX_CASE_BYTES = 600_000

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
    # head_dim 32: a quantized KV cache (group size 32) needs head_dim
    # divisible by the group size; used by make_generation_goldens.py.
    {
        "name": "llama_hd32",
        "model_type": "llama",
        "config": {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32},
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


# ---------------------------------------------------------------------------
# Taps: intermediate values of the whole-prompt forward, under engine names.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tap:
    """One row of the TAPS table.

    module     mlx-lm module path from the top-level model ("" is the model
               itself, whose output is the logits); "{i}" is a layer index.
    name       the engine's tap name; "{i}" is the same layer index.
    call       which call of the module during the forward (0 = the first),
               for modules called more than once (the rope: queries, keys).
    transform  None, or "transpose_heads": [B, T, H, D] -> [B, H, T, D].
    residual   if set, the tap is not a module output but the module's first
               input plus the output of this child module (the residual
               sum inside a layer).
    detail     a per-head attention tap: omitted first when a case would
               exceed its size budget.
    """

    module: str
    name: str
    call: int = 0
    transform: Optional[str] = None
    residual: Optional[str] = None
    detail: bool = False


# One table for every architecture, in forward order. Rows whose module does
# not exist in a model are skipped (q_norm/k_norm outside qwen3), so another
# architecture is added by adding its rows. Consecutive rows with "{i}" are
# expanded for each layer in turn (layer 0's rows, then layer 1's, ...).
# Two rows that exist in one model must not produce the same name.
TAPS = [
    # llama / mistral / qwen2 / qwen3 (mlx_lm.models.llama, qwen2, qwen3)
    Tap("model.embed_tokens", "embed"),
    Tap("model.layers.{i}.input_layernorm", "layers.{i}.attn_norm"),
    Tap("model.layers.{i}.self_attn.q_proj", "layers.{i}.attn.q", detail=True),
    Tap("model.layers.{i}.self_attn.k_proj", "layers.{i}.attn.k", detail=True),
    Tap("model.layers.{i}.self_attn.v_proj", "layers.{i}.attn.v", detail=True),
    Tap("model.layers.{i}.self_attn.q_norm", "layers.{i}.attn.q_norm",
        transform="transpose_heads", detail=True),
    Tap("model.layers.{i}.self_attn.k_norm", "layers.{i}.attn.k_norm",
        transform="transpose_heads", detail=True),
    Tap("model.layers.{i}.self_attn.rope", "layers.{i}.attn.q_rope", call=0, detail=True),
    Tap("model.layers.{i}.self_attn.rope", "layers.{i}.attn.k_rope", call=1, detail=True),
    Tap("model.layers.{i}.self_attn.o_proj", "layers.{i}.attn.o"),
    Tap("model.layers.{i}.self_attn.o_proj", "layers.{i}.attn"),
    Tap("model.layers.{i}", "layers.{i}.h", residual="self_attn"),
    Tap("model.layers.{i}.post_attention_layernorm", "layers.{i}.mlp_norm"),
    Tap("model.layers.{i}.mlp.gate_proj", "layers.{i}.mlp.gate"),
    Tap("model.layers.{i}.mlp.up_proj", "layers.{i}.mlp.up"),
    Tap("model.layers.{i}.mlp.down_proj", "layers.{i}.mlp.down"),
    Tap("model.layers.{i}.mlp", "layers.{i}.mlp"),
    Tap("model.layers.{i}", "layers.{i}"),
    Tap("model.norm", "norm"),
    Tap("", "logits"),
]

TAP_TRANSFORMS = {
    None: lambda x: x,
    "transpose_heads": lambda x: x.transpose(0, 2, 1, 3),
}


def walk(root, path):
    """The object at a dotted path of modules and list indices, or None."""
    obj = root
    for part in path.split(".") if path else []:
        if isinstance(obj, (list, tuple)):
            if not part.isdigit() or int(part) >= len(obj):
                return None
            obj = obj[int(part)]
        elif isinstance(obj, nn.Module) and part in obj:
            obj = obj[part]
        else:
            return None
    return obj


@dataclass
class BoundTap:
    """A TAPS row resolved against one model (and one layer)."""

    name: str
    path: str
    module: nn.Module
    row: Tap
    residual_module: Optional[nn.Module] = None


def bind_taps(model, table=TAPS):
    """The rows of ``table`` that exist in ``model``, expanded, in forward order."""
    expanded = []
    k = 0
    while k < len(table):
        if "{i}" not in table[k].module:
            expanded.append((table[k], None))
            k += 1
            continue
        run = []
        while k < len(table) and "{i}" in table[k].module:
            run.append(table[k])
            k += 1
        layers = walk(model, run[0].module.split("{i}")[0].rstrip("."))
        count = len(layers) if isinstance(layers, (list, tuple)) else 0
        expanded += [(row, i) for i in range(count) for row in run]

    bound, names, paths = [], set(), {}
    for row, i in expanded:
        index = "" if i is None else str(i)
        path = row.module.replace("{i}", index)
        name = row.name.replace("{i}", index)
        module = walk(model, path)
        if not isinstance(module, nn.Module):
            continue
        residual_module = None
        if row.residual is not None:
            residual_module = walk(module, row.residual)
            if not isinstance(residual_module, nn.Module):
                continue
        if name in names:
            raise RuntimeError(f"two TAPS rows give the tap name {name!r}")
        names.add(name)
        for m, p in [(module, path), (residual_module, f"{path}.{row.residual}")]:
            if m is not None and paths.setdefault(id(m), p) != p:
                raise RuntimeError(f"{p} and {paths[id(m)]} are one shared module")
        bound.append(BoundTap(name, path, module, row, residual_module))
    return bound


_CALL_LOGS = {}
_RECORDING_CLASSES = {}


def _recording_class(cls):
    """A subclass of ``cls`` whose __call__ logs (first input, output)."""
    if cls not in _RECORDING_CLASSES:

        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            log = _CALL_LOGS.get(id(self))
            if log is not None:
                log.append((args[0] if args else None, out))
            return out

        _RECORDING_CLASSES[cls] = type(
            cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__}
        )
    return _RECORDING_CLASSES[cls]


@contextmanager
def recording_calls(modules):
    """Log every call of each module while in the context.

    Yields {id(module): [(first positional input, output), ...]}. Each module
    temporarily gets a subclass of its own class as its class; the original
    classes are restored on exit.
    """
    swapped = []
    try:
        for module in modules:
            if id(module) in _CALL_LOGS:
                continue
            _CALL_LOGS[id(module)] = []
            swapped.append((module, type(module)))
            module.__class__ = _recording_class(type(module))
        yield {id(m): _CALL_LOGS[id(m)] for m in modules}
    finally:
        for module, cls in swapped:
            module.__class__ = cls
            del _CALL_LOGS[id(module)]


def forward_with_taps(model, tokens, taps):
    """The cache-free forward over ``tokens``, with the bound taps captured.

    Returns (logits [L, V] float32, {tap name: float32 array with batch axis})
    with the taps in the order of ``taps``.
    """
    modules = {}
    for tap in taps:
        for m in (tap.module, tap.residual_module):
            if m is not None:
                modules[id(m)] = m
    with recording_calls(list(modules.values())) as logs:
        logits = model(mx.array(tokens)[None])
        values = {}
        for tap in taps:
            calls = logs[id(tap.module)]
            if tap.row.call >= len(calls):
                raise RuntimeError(
                    f"tap {tap.name}: {tap.path or 'model'} was called "
                    f"{len(calls)} times, the table asks for call {tap.row.call}"
                )
            x, value = calls[tap.row.call]
            if tap.residual_module is not None:
                (_, r), *rest = logs[id(tap.residual_module)]
                if rest:
                    raise RuntimeError(f"tap {tap.name}: residual module called twice")
                value = x + r
            values[tap.name] = TAP_TRANSFORMS[tap.row.transform](value).astype(mx.float32)
    mx.eval(logits, *values.values())
    logits = np.array(logits[0].astype(mx.float32))
    return logits, {name: np.array(v) for name, v in values.items()}


# ---------------------------------------------------------------------------
# Consistency checks of the captured taps.
# ---------------------------------------------------------------------------


def _np(a):
    return np.array(a.astype(mx.float32))


def _linear(module, x):
    return _np(module(mx.array(x)))


def _rms_norm(x, weight, eps):
    """RMS norm in numpy (float64), independent of mlx."""
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _embedding_table(embed):
    """The dense embedding matrix of an (optionally quantized) nn.Embedding."""
    if "scales" in embed:
        return _np(
            mx.dequantize(
                embed.weight,
                embed.scales,
                embed.get("biases"),
                group_size=embed.group_size,
                bits=embed.bits,
                mode=getattr(embed, "mode", "affine"),
            )
        )
    return _np(embed.weight)


def check_taps(model, tokens, logits, taps):
    """Check the captured llama-family taps against each other and the model.

    Each check recomputes one tap from other taps (with the model's modules,
    or numpy for the norms and the embedding) and compares. Returns
    {check: max abs difference}; raises if a difference is not tiny. Checks
    whose taps are absent are skipped. Float32 models must match to 1e-5
    (relative to the largest value) and "exact" checks bit for bit; models
    with 16-bit parameters, whose taps were rounded before the float32 cast,
    to 3e-2.
    """
    results = {}
    float32 = parameter_dtypes(model) == "float32"
    rel_tol = 1e-5 if float32 else 3e-2

    def compare(label, got, want, exact=False):
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            raise RuntimeError(f"tap check {label}: shape {got.shape} != {want.shape}")
        diff = float(np.max(np.abs(got - want))) if got.size else 0.0
        tol = 0.0 if exact and float32 else rel_tol * max(1.0, float(np.max(np.abs(want))))
        if diff > tol:
            raise RuntimeError(f"tap check {label}: max abs difference {diff:.3g} > {tol:.3g}")
        results[label] = diff

    def have(*names):
        return all(n in taps for n in names)

    if have("logits"):
        compare("tap.logits == logits", taps["logits"][0], logits, exact=True)
    # The remaining checks know the llama-family module names only.
    llama_family = [
        "model.embed_tokens", "model.norm", "model.layers.0.input_layernorm",
        "model.layers.0.self_attn", "model.layers.0.post_attention_layernorm",
        "model.layers.0.mlp",
    ]
    if not all(isinstance(walk(model, path), nn.Module) for path in llama_family):
        print("note: not a llama-family module layout; only tap.logits was checked")
        return results
    inner = model.model
    if have("embed"):
        table = _embedding_table(inner.embed_tokens)
        compare("embed == embedding rows of the tokens", taps["embed"][0], table[tokens])

    n_layers = len(inner.layers)
    for i, layer in enumerate(inner.layers):
        p = f"layers.{i}"
        x = taps.get("embed") if i == 0 else taps.get(f"layers.{i - 1}")
        attn = layer.self_attn
        if have(f"{p}.attn_norm") and x is not None:
            norm = layer.input_layernorm
            compare(f"{p}.attn_norm == rms_norm(layer input)",
                    taps[f"{p}.attn_norm"], _rms_norm(x, _np(norm.weight), norm.eps))
        if have(f"{p}.attn.o", f"{p}.attn"):
            compare(f"{p}.attn == {p}.attn.o", taps[f"{p}.attn"], taps[f"{p}.attn.o"], exact=True)
        if have(f"{p}.h", f"{p}.attn") and x is not None:
            compare(f"{p}.h == layer input + {p}.attn", taps[f"{p}.h"], x + taps[f"{p}.attn"],
                    exact=True)
        if have(f"{p}.attn_norm"):
            for proj, short in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
                if have(f"{p}.attn.{short}"):
                    compare(f"{p}.attn.{short} == {proj}(attn_norm)", taps[f"{p}.attn.{short}"],
                            _linear(attn[proj], taps[f"{p}.attn_norm"]))
        heads_in = {}
        for short, n_heads in (("q", attn.n_heads), ("k", attn.n_kv_heads), ("v", attn.n_kv_heads)):
            if have(f"{p}.attn.{short}"):
                t = taps[f"{p}.attn.{short}"]
                heads_in[short] = t.reshape(t.shape[0], t.shape[1], n_heads, -1)
        for short in ("q", "k"):
            if have(f"{p}.attn.{short}_norm") and short in heads_in:
                norm = attn[f"{short}_norm"]
                compare(f"{p}.attn.{short}_norm == rms_norm({short} heads), [B, H, T, D]",
                        taps[f"{p}.attn.{short}_norm"],
                        _rms_norm(heads_in[short], _np(norm.weight), norm.eps)
                        .transpose(0, 2, 1, 3))
        for short in ("q", "k"):
            src = taps.get(f"{p}.attn.{short}_norm")
            if src is None and short in heads_in:
                src = heads_in[short].transpose(0, 2, 1, 3)
            if have(f"{p}.attn.{short}_rope") and src is not None:
                compare(f"{p}.attn.{short}_rope == rope(its input)", taps[f"{p}.attn.{short}_rope"],
                        _np(attn.rope(mx.array(src))))
        if have(f"{p}.attn.q_rope", f"{p}.attn.k_rope", f"{p}.attn.o") and "v" in heads_in:
            out = mx.fast.scaled_dot_product_attention(
                mx.array(taps[f"{p}.attn.q_rope"]),
                mx.array(taps[f"{p}.attn.k_rope"]),
                mx.array(heads_in["v"].transpose(0, 2, 1, 3)),
                scale=attn.scale,
                mask="causal",
            )
            B, _, T, _ = out.shape
            merged = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
            compare(f"{p}.attn.o == o_proj(causal sdpa(q_rope, k_rope, v))",
                    taps[f"{p}.attn.o"], _linear(attn.o_proj, merged))
        if have(f"{p}.mlp_norm", f"{p}.h"):
            norm = layer.post_attention_layernorm
            compare(f"{p}.mlp_norm == rms_norm({p}.h)", taps[f"{p}.mlp_norm"],
                    _rms_norm(taps[f"{p}.h"], _np(norm.weight), norm.eps))
        mlp = layer.mlp
        if have(f"{p}.mlp_norm", f"{p}.mlp.gate", f"{p}.mlp.up"):
            compare(f"{p}.mlp.gate == gate_proj(mlp_norm)", taps[f"{p}.mlp.gate"],
                    _linear(mlp.gate_proj, taps[f"{p}.mlp_norm"]))
            compare(f"{p}.mlp.up == up_proj(mlp_norm)", taps[f"{p}.mlp.up"],
                    _linear(mlp.up_proj, taps[f"{p}.mlp_norm"]))
        if have(f"{p}.mlp.gate", f"{p}.mlp.up", f"{p}.mlp.down"):
            gate, up = taps[f"{p}.mlp.gate"], taps[f"{p}.mlp.up"]
            act = gate / (1.0 + np.exp(-gate.astype(np.float64))) * up
            compare(f"{p}.mlp.down == down_proj(silu(gate) * up)", taps[f"{p}.mlp.down"],
                    _linear(mlp.down_proj, act.astype(np.float32)))
        if have(f"{p}.mlp", f"{p}.mlp.down"):
            compare(f"{p}.mlp == {p}.mlp.down", taps[f"{p}.mlp"], taps[f"{p}.mlp.down"], exact=True)
        if have(p, f"{p}.h", f"{p}.mlp"):
            compare(f"{p} == {p}.h + {p}.mlp", taps[p], taps[f"{p}.h"] + taps[f"{p}.mlp"],
                    exact=True)

    last = f"layers.{n_layers - 1}"
    if have("norm", last):
        compare(f"norm == model.norm({last})", taps["norm"],
                _np(inner.norm(mx.array(taps[last]))))
        compare(f"norm == rms_norm({last}) (numpy)", taps["norm"],
                _rms_norm(taps[last], _np(inner.norm.weight), inner.norm.eps))
    if have("norm", "logits"):
        head = model.get("lm_head")
        projected = head(mx.array(taps["norm"])) if head is not None else (
            inner.embed_tokens.as_linear(mx.array(taps["norm"])))
        compare("logits == lm_head(norm)", taps["logits"], _np(projected))
    return results


# ---------------------------------------------------------------------------
# Cases.
# ---------------------------------------------------------------------------


def generator_command(name, seed, out_rel, model_type=None, overrides=None, quant=None,
                      model_dir=None, prompt_tokens=None, max_case_bytes=None):
    """The exact command line that regenerates one case."""
    parts = [PYTHON, SCRIPT, "--case", name]
    if model_dir is not None:
        parts += ["--model-dir", model_dir]
    else:
        parts += ["--model-type", model_type, "--config-json", json.dumps(overrides)]
    if quant is not None:
        parts += ["--quantize", str(quant["bits"]), "--group-size", str(quant["group_size"])]
        if quant.get("overrides"):
            parts += ["--quant-overrides", json.dumps(quant["overrides"])]
    if prompt_tokens is not None:
        parts += ["--prompt-tokens", ",".join(str(t) for t in prompt_tokens)]
    if max_case_bytes is not None:
        parts += ["--max-case-bytes", str(max_case_bytes)]
    parts += ["--seed", str(seed), "--out", out_rel]
    return " ".join(shlex.quote(p) for p in parts)


def directory_size(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def repo_relative(path):
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(Path(path).resolve())


def vocab_size_of(config):
    for source in (config, config.get("text_config", {})):
        if "vocab_size" in source:
            return int(source["vocab_size"])
    raise SystemExit("the model config has no vocab_size")


def build_random_model(name, model_type, overrides, seed, quant, model_dir):
    """Build, randomize, optionally quantize and save a model; check it reloads."""
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
    model_dir.mkdir(parents=True)
    save_config(copy.deepcopy(config), model_dir / "config.json")
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(
        str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"}
    )

    # The saved directory must load back in mlx-lm to the identical model.
    reloaded, _ = load_model(model_dir)
    reloaded_weights = dict(tree_flatten(reloaded.parameters()))
    if sorted(reloaded_weights) != sorted(weights):
        raise RuntimeError(f"{name}: reloaded parameter names differ")
    for key, value in weights.items():
        if not np.array_equal(np.array(value), np.array(reloaded_weights[key])):
            raise RuntimeError(f"{name}: reloaded parameter {key} differs")
    return model, config, reloaded


def parameter_dtypes(model):
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters())
                     if mx.issubdtype(v.dtype, mx.floating)})
    return ",".join(dtypes)


def main_dtype(model):
    """The floating dtype holding the most parameter elements ("bfloat16", ...)."""
    counts = {}
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            name = str(v.dtype).replace("mlx.core.", "")
            counts[name] = counts.get(name, 0) + v.size
    return max(counts, key=counts.get)


def make_case(name, out_dir, seed=0, model_type=None, overrides=None, quant=None,
              model_dir=None, prompt_tokens=None, max_case_bytes=None,
              max_case_bytes_flag=None):
    """Build or load, run, check and record one golden case. Returns a summary.

    Either model_type/overrides/quant (a random model, saved under
    out_dir/model) or model_dir (an existing mlx-lm model directory, not
    copied). max_case_bytes: if the case directory would be larger, the
    per-head ("detail") taps are left out; None means no limit.
    max_case_bytes_flag: the --max-case-bytes value given, for the
    recorded command.
    """
    out_dir = Path(out_dir)
    if model_dir is not None:
        model_dir = Path(model_dir).resolve()
        if out_dir.resolve() == model_dir or out_dir.resolve() in model_dir.parents:
            raise SystemExit(f"--out {out_dir} would delete the model directory {model_dir}")
        vocab = vocab_size_of(load_config(model_dir))
    else:
        vocab = vocab_size_of(build_config(model_type, overrides))

    if prompt_tokens is None:
        rng = np.random.RandomState(seed)
        tokens = rng.randint(1, vocab, size=PROMPT_LEN).astype(np.int32)
    else:
        tokens = np.array(prompt_tokens, dtype=np.int32)
        if len(tokens) < 2:
            raise SystemExit("--prompt-tokens needs at least 2 tokens")
        if np.any((tokens < 0) | (tokens >= vocab)):
            raise SystemExit(f"--prompt-tokens must lie in [0, {vocab})")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    if model_dir is None:
        model, config, reloaded = build_random_model(
            name, model_type, overrides, seed, quant, out_dir / "model"
        )
    else:
        model, config = load_model(model_dir)
        model_type = config.get("model_type")
        reloaded = None

    prompt_len = len(tokens)
    split = min(PREFILL_SPLIT, prompt_len - 1)

    logits = forward_logits(model, tokens)
    taps = bind_taps(model)
    tap_logits, tap_values = forward_with_taps(model, tokens, taps)
    if not np.array_equal(tap_logits, logits):
        raise RuntimeError(f"{name}: the tapped forward gives different logits")
    if tuple(tap_values) != tuple(t.name for t in taps):
        raise RuntimeError(f"{name}: taps out of order")
    tap_checks = check_taps(model, tokens, logits, tap_values)

    pd_logits = prefill_decode_logits(model, tokens, split)
    greedy = greedy_tokens(model, tokens, GREEDY_TOKENS)

    if reloaded is not None and not np.array_equal(forward_logits(reloaded, tokens), logits):
        raise RuntimeError(f"{name}: reloaded model gives different logits")

    if len(set(greedy.tolist())) == 1:
        message = f"{name}: greedy continuation is a single repeated token"
        if model_dir is None:
            raise RuntimeError(message)
        print(f"warning: {message}")

    # How close each greedy choice was to a tie: a small margin means another
    # implementation may legitimately pick a different token.
    replay = forward_logits(model, np.concatenate([tokens, greedy[:-1]]))[prompt_len - 1 :]
    top2 = np.sort(replay, axis=-1)[:, -2:]
    greedy_margin = float(np.min(top2[:, 1] - top2[:, 0]))
    if not np.array_equal(np.argmax(replay, axis=-1), greedy):
        print(f"warning: {name}: cached greedy differs from an uncached replay")

    def write(tap_names):
        mx.save_safetensors(
            str(out_dir / "golden.safetensors"),
            {
                "tokens": mx.array(tokens, dtype=mx.int32),
                "logits": mx.array(logits, dtype=mx.float32),
                "prefill_decode_logits": mx.array(pd_logits, dtype=mx.float32),
                "greedy": mx.array(greedy, dtype=mx.int32),
                **{f"tap.{n}": mx.array(tap_values[n], dtype=mx.float32) for n in tap_names},
            },
        )
        return directory_size(out_dir)

    tap_names = [t.name for t in taps]
    omitted = []
    size = write(tap_names)
    if max_case_bytes is not None and size > max_case_bytes:
        omitted = [t.name for t in taps if t.row.detail]
        tap_names = [t.name for t in taps if not t.row.detail]
        size = write(tap_names)

    meta = {
        "case": name,
        "model_type": model_type,
        "generator": generator_command(
            name,
            seed,
            repo_relative(out_dir),
            model_type=model_type,
            overrides=overrides,
            quant=quant,
            model_dir=None if model_dir is None else repo_relative(model_dir),
            prompt_tokens=prompt_tokens,
            max_case_bytes=max_case_bytes_flag,
        ),
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "seed": seed,
        "dtype": "float32" if model_dir is None else main_dtype(model),
        "quantization": config.get("quantization"),
        "prompt_len": prompt_len,
        "prefill_split": split,
        "greedy_tokens": GREEDY_TOKENS,
    }
    if model_dir is not None:
        meta["model_dir"] = repo_relative(model_dir)
    meta["taps"] = tap_names
    meta["taps_omitted_for_size"] = omitted
    with open(out_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")

    size = directory_size(out_dir)
    summary = {
        "case": name,
        "bytes": size,
        "taps": len(tap_names),
        "taps_omitted": len(omitted),
        "tap_checks": len(tap_checks),
        "tap_check_max_diff": max(tap_checks.values(), default=0.0),
        "max_abs_prefill_decode_vs_logits": float(np.max(np.abs(pd_logits - logits))),
        "logits_std": float(np.std(logits)),
        "distinct_greedy": len(set(greedy.tolist())),
        "greedy_margin": greedy_margin,
        "greedy": greedy.tolist(),
    }
    print(
        f"{name}: {summary['bytes']} bytes, {summary['taps']} taps"
        + (f" ({len(omitted)} per-head taps omitted for size)" if omitted else "")
        + f", {summary['tap_checks']} tap checks passed "
        f"(max diff {summary['tap_check_max_diff']:.3g}), "
        f"max|prefill_decode - logits| = {summary['max_abs_prefill_decode_vs_logits']:.3g}, "
        f"logits std = {summary['logits_std']:.3f}, "
        f"{summary['distinct_greedy']} distinct greedy tokens, "
        f"min greedy top-2 margin = {summary['greedy_margin']:.4f}"
    )
    return summary


def compare_case(case_dir, before_dir):
    """Check a case's non-tap contents equal those of an earlier copy.

    model/ files must be byte-identical; every golden.safetensors entry of
    the earlier copy must exist with the same dtype, shape and bytes; the
    only new entries may be tap.*. Returns the number of entries compared.
    """
    case_dir, before_dir = Path(case_dir), Path(before_dir)
    for f in sorted((before_dir / "model").glob("*")) if (before_dir / "model").exists() else []:
        if f.read_bytes() != (case_dir / "model" / f.name).read_bytes():
            raise RuntimeError(f"{case_dir}: model/{f.name} differs from {f}")
    old = mx.load(str(before_dir / "golden.safetensors"))
    new = mx.load(str(case_dir / "golden.safetensors"))
    for key, value in old.items():
        if key not in new:
            raise RuntimeError(f"{case_dir}: {key} is missing")
        a, b = np.array(value), np.array(new[key])
        if value.dtype != new[key].dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            raise RuntimeError(f"{case_dir}: {key} differs from {before_dir}")
    extra = [k for k in new if k not in old and not k.startswith("tap.")]
    if extra:
        raise RuntimeError(f"{case_dir}: unexpected new entries {extra}")
    return len(old)


def find_case(name):
    for case in CASES:
        if case["name"] == name:
            return case
    raise SystemExit(f"unknown case {name!r}; known: {[c['name'] for c in CASES]}")


def parse_prompt_tokens(text):
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"--prompt-tokens: expected comma-separated integers, got {text!r}")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--all", action="store_true", help="regenerate every case in CASES")
    parser.add_argument("--case", help="case name (default with --model-dir: the directory name)")
    parser.add_argument("--model-type", help="mlx-lm model_type (omit to use the CASES entry)")
    parser.add_argument(
        "--model-dir",
        help="an existing mlx-lm model directory (config.json + safetensors) "
        "instead of a random model; it is not copied into the case",
    )
    parser.add_argument("--config-json", default="{}", help="config overrides as JSON")
    parser.add_argument("--quantize", type=int, metavar="BITS", help="quantize with BITS bits")
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size")
    parser.add_argument(
        "--quant-overrides",
        default="{}",
        help="per-layer quantization as JSON: {path: {group_size, bits} | false}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompt-tokens", metavar="IDS", help="the prompt as comma-separated token ids "
        "(default: PROMPT_LEN random ids from the seed)"
    )
    parser.add_argument(
        "--max-case-bytes",
        type=int,
        help="size budget of a case directory; over it the per-head taps are "
        f"omitted (default {MAX_CASE_BYTES} for generated cases, none with "
        "--model-dir; 0: no limit)",
    )
    parser.add_argument("--out", help="output directory (default goldens/CASE)")
    parser.add_argument(
        "--goldens-dir",
        default=str(REPO_ROOT / "goldens"),
        help="root directory for --all and default --out",
    )
    parser.add_argument(
        "--compare-to",
        metavar="DIR",
        help="after writing, check each case's non-tap contents equal DIR/CASE's",
    )
    args = parser.parse_args(argv)
    if not args.all and not args.case and not args.model_dir:
        parser.error("one of --all, --case or --model-dir is required")
    if args.model_dir and (args.all or args.model_type or args.quantize is not None):
        parser.error("--model-dir cannot be combined with --all, --model-type or --quantize")
    if args.all and args.prompt_tokens:
        parser.error("--prompt-tokens cannot be combined with --all")
    return args


def main(argv=None):
    args = parse_args(argv)
    mx.set_default_device(mx.cpu)
    goldens_dir = Path(args.goldens_dir)
    prompt_tokens = parse_prompt_tokens(args.prompt_tokens) if args.prompt_tokens else None
    if args.max_case_bytes is None:
        budget = None if args.model_dir else MAX_CASE_BYTES
    else:
        budget = args.max_case_bytes or None

    jobs = []
    if args.all:
        for case in CASES:
            jobs.append(dict(name=case["name"], out_dir=goldens_dir / case["name"],
                             model_type=case["model_type"], overrides=case["config"],
                             quant=case.get("quantize")))
    elif args.model_dir:
        name = args.case or Path(args.model_dir).resolve().name
        jobs.append(dict(name=name, out_dir=Path(args.out) if args.out else goldens_dir / name,
                         model_dir=args.model_dir))
    else:
        out_dir = Path(args.out) if args.out else goldens_dir / args.case
        if args.model_type is None:
            case = find_case(args.case)
            jobs.append(dict(name=case["name"], out_dir=out_dir, model_type=case["model_type"],
                             overrides=case["config"], quant=case.get("quantize")))
        else:
            quant = None
            if args.quantize is not None:
                quant = {
                    "bits": args.quantize,
                    "group_size": args.group_size,
                    "overrides": json.loads(args.quant_overrides),
                }
            jobs.append(dict(name=args.case, out_dir=out_dir, model_type=args.model_type,
                             overrides=json.loads(args.config_json), quant=quant))

    summaries = [
        make_case(seed=args.seed, prompt_tokens=prompt_tokens, max_case_bytes=budget,
                  max_case_bytes_flag=args.max_case_bytes, **job)
        for job in jobs
    ]
    if len(summaries) > 1:
        total = sum(s["bytes"] for s in summaries)
        print(f"{len(summaries)} cases, {total} bytes in total")
    if args.compare_to:
        for job in jobs:
            count = compare_case(job["out_dir"], Path(args.compare_to) / job["name"])
            print(f"{job['name']}: model/ and {count} golden entries identical to {args.compare_to}")


if __name__ == "__main__":
    main(sys.argv[1:])
