#!/usr/bin/env python3
"""Differential fuzzing of config handling: lmspec against its references.

For each model type a spec claims, samples random valid configs from the
keys the reference's ModelArgs reads (mlx-lm's; mlx-embeddings' for the
encoders mlx-lm lacks) (head counts and widths, GQA ratios, tied or
untied heads, rope scaling kinds and both config layouts, per-layer sliding
windows shorter than the prompt, biases and other switches, norm epsilons,
MoE expert counts, top-k and groups, 4- and 8-bit affine quantization for a
fifth of the samples), builds a tiny random float32 model with the reference
for each, records its whole-prompt logits, prefill-then-decode logits and
greedy tokens (an encoder: its last hidden states) as a golden case without
taps, and asks `lmspec golden` for the same.

A VLM wrapper whose ModelArgs holds only model_type and text_config (gemma3,
qwen2_vl, pixtral, kimi_vl, qwen3_5, ...) is sampled from its text model's
keys instead: those of the text type its base case names
(text_config.model_type), else of the wrapper's own text class, drawn under
text_config ("text_config.KEY" in the reports), or at the top level where
the base case keeps the text keys there (qwen2_vl, qwen3_5).

Each sample ends as one of:

    match     lmspec agrees (float32 tolerance, identical greedy tokens)
    refused   lmspec refuses the config with an error that names one of the
              keys the sample set
    MISMATCH  lmspec runs but disagrees: a silent misread
    UNCLEAR   lmspec refuses without naming a key the sample set

A MISMATCH or UNCLEAR sample is minimised: its keys are put back to the
base config one at a time while the failure stays, and the keys left are
reported. A sample the reference itself cannot build or run is drawn again. Samples
whose greedy choice is a near tie are drawn again with another seed.

Usage (from the repository root):

    .venv/bin/python porting-tools/python/fuzz_configs.py --per-type 40 --seed 1 \\
        --lmspec target/debug/lmspec [--types llama,qwen3] [--keep DIR]

Exit status 0 when no sample was a MISMATCH or UNCLEAR; 1 otherwise.
"""
import argparse
import copy
import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden as mg  # noqa: E402
import mlx_lm  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

GREEDY = 8
ROPE_SCALINGS = [
    {"type": "linear", "factor": 2.0},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
     "beta_fast": 32, "beta_slow": 1},
    {"rope_type": "default"},
]
# Types whose widths are tied to many other sizes (latent attention, state
# spaces, hybrids): their dims stay as in the base case.
FIXED_DIMS = {"deepseek_v2", "deepseek_v3", "mamba2", "lfm2", "qwen3_next", "gpt2", "gpt_neox",
              "internlm2", "phi", "phi3", "qwen2_moe", "qwen3_moe", "mixtral", "olmo2"}
FIXED_DIMS |= mg.FUZZ_FIXED_DIMS
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


# Encoders mlx-lm lacks, held to mlx-embeddings: a small base config each.
ENCODERS = {
    "bert": {"model_type": "bert", "num_hidden_layers": 2, "num_attention_heads": 4,
             "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 64,
             "vocab_size": 256, "type_vocab_size": 2, "layer_norm_eps": 1e-12},
}


def embeddings_module(model_type):
    """mlx-embeddings' model module, imported without the package's own
    __init__ (whose dependencies the setup does not install)."""
    import importlib
    import types
    name = "_mlx_embeddings_models"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(mlx_lm.__file__).parent.parent / "mlx_embeddings" / "models")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.{model_type}")


def reference_fields(model_type):
    if model_type in ENCODERS:
        args_class = embeddings_module(model_type).ModelArgs
    else:
        config = mg.build_config(model_type, {})
        _, args_class = mg._get_classes(config)
    return {f.name: f for f in dataclasses.fields(args_class)}


TEXT = "text_config."
TEXT_ARGS_NAMES = ("TextArgs", "TextModelArgs", "TextConfig")


def text_reference(model_type, base):
    """For a VLM wrapper whose ModelArgs reads text_config: (prefix, the
    fields of the class that reads the text keys, the base text config);
    prefix is "text_config." or "" when the base case has the text keys at
    the top level (the wrapper's from_dict then takes them as text_config).
    None for other types."""
    if model_type in ENCODERS:
        return None
    model_class, args_class = mg._get_classes(base)
    if "text_config" not in {f.name for f in dataclasses.fields(args_class)}:
        return None
    nested = isinstance(base.get("text_config"), dict)
    text_base = base["text_config"] if nested else base
    text_class = None
    if nested:  # the text type the base case names
        try:
            text_class = mg._get_classes({"model_type": text_base.get("model_type")})[1]
        except (ValueError, TypeError):
            pass
    # Else the wrapper's own text class (kimi_vl's TextArgs, qwen3_5's
    # TextModelArgs, also where qwen3_5_moe's Model comes from), else the
    # text model module it imports (qwen2_vl: qwen2).
    modules = [sys.modules[args_class.__module__]]
    modules += [sys.modules[c.__module__] for c in model_class.__mro__
                if c.__module__.startswith("mlx_lm.models.")]
    for module in modules:
        if text_class is None:
            text_class = next((getattr(module, n) for n in TEXT_ARGS_NAMES
                               if dataclasses.is_dataclass(getattr(module, n, None))), None)
    if text_class is None:
        imported = {m.ModelArgs for m in vars(modules[0]).values()
                    if inspect.ismodule(m) and m.__name__.startswith("mlx_lm.models.")
                    and hasattr(m, "ModelArgs")}
        if len(imported) != 1:
            raise RuntimeError(f"{model_type}: no text model class found")
        text_class = imported.pop()
    fields = {f.name: f for f in dataclasses.fields(text_class) if f.name != "model_type"}
    return (TEXT if nested else ""), fields, text_base


def config_overrides(overrides, text_base):
    """A sample's overrides as make_golden takes them: "text_config.KEY"
    entries go into a copy of the base text_config."""
    out = {k: v for k, v in overrides.items() if not k.startswith(TEXT)}
    nested = {k[len(TEXT):]: v for k, v in overrides.items() if k.startswith(TEXT)}
    if nested:
        out["text_config"] = {**copy.deepcopy(out.get("text_config", text_base)), **nested}
    return out


def set_keys(overrides):
    """The key names a sample sets, as lmspec may name them in a refusal."""
    keys = list(overrides)
    keys += [k[len(TEXT):] for k in overrides if k.startswith(TEXT)]
    if isinstance(overrides.get("text_config"), dict):
        keys += list(overrides["text_config"])
        keys += [TEXT + k for k in overrides["text_config"]]
    return keys


def base_case(model_type):
    for case in mg.CASES:
        if case["name"] == model_type:
            return case
    for case in mg.CASES:
        if case["model_type"] == model_type and "quant" not in case and "hf_layout" not in case:
            return case
    return None


def field_default(field, base):
    if field.name in base:
        return base[field.name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return None


def sample(rng, model_type, fields, base):
    """Overrides on top of the base case's config."""
    out = {}
    layers = base.get("num_hidden_layers", 2)
    if model_type not in FIXED_DIMS and "num_attention_heads" in fields and "hidden_size" in fields:
        heads = int(rng.choice([2, 4, 8]))
        head_dim = int(rng.choice([8, 16]))
        out["num_attention_heads"] = heads
        out["hidden_size"] = heads * head_dim
        if "num_key_value_heads" in fields:
            out["num_key_value_heads"] = int(rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0]))
        if "head_dim" in fields:
            out["head_dim"] = int(rng.choice([head_dim, 2 * head_dim]))
        layers = int(rng.choice([1, 2, 3]))
        out["num_hidden_layers"] = layers
        if "no_rope_layers" in fields:
            out["no_rope_layers"] = [int(rng.randint(2)) for _ in range(layers)]
    for name, f in fields.items():
        value = field_default(f, base)
        if isinstance(value, bool) and rng.rand() < 0.4:
            out[name] = not value
    if "rope_theta" in fields and rng.rand() < 0.5:
        out["rope_theta"] = float(rng.choice([1e4, 5e5, 1e6]))
    if "rope_scaling" in fields and rng.rand() < 0.5:
        out["rope_scaling"] = copy.deepcopy(ROPE_SCALINGS[rng.randint(len(ROPE_SCALINGS))])
    if "rope_parameters" in fields and rng.rand() < 0.4:
        theta = float(rng.choice([1e4, 5e5, 1e6]))
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        if rng.rand() < 0.5:
            out["rope_theta"] = None
    if "layer_types" in fields and "sliding_window" in fields and rng.rand() < 0.5:
        out["layer_types"] = [str(rng.choice(["full_attention", "sliding_attention"]))
                              for _ in range(layers)]
        out["sliding_window"] = int(rng.choice([2, 3, 5]))
    elif "sliding_window" in fields and "sliding_window_pattern" in fields and rng.rand() < 0.5:
        out["sliding_window"] = int(rng.choice([2, 3, 5]))
        out["sliding_window_pattern"] = int(rng.choice([1, 2, 3]))
    for name in fields:
        if (name.endswith("eps") or name.endswith("epsilon")) and rng.rand() < 0.3:
            out[name] = float(rng.choice([1e-6, 1e-5, 1e-3]))
    if "type_vocab_size" in fields and rng.rand() < 0.5:
        out["type_vocab_size"] = int(rng.choice([1, 2, 3]))
    if model_type in ENCODERS and rng.rand() < 0.5:
        out["max_position_embeddings"] = int(rng.choice([16, 64, 512]))
    if "partial_rotary_factor" in fields and rng.rand() < 0.5:
        out["partial_rotary_factor"] = float(rng.choice([0.25, 0.5, 1.0]))
    expert_key = next((k for k in EXPERT_KEYS if base.get(k) and k in fields), None)
    if expert_key and rng.rand() < 0.6:
        experts = int(rng.choice([2, 4, 6, 8]))
        out[expert_key] = experts
        out["num_experts_per_tok"] = int(rng.randint(1, experts + 1))
        if "n_group" in fields and base.get("n_group"):
            groups = int(rng.choice([g for g in (1, 2, 3, 4) if experts % g == 0]))
            out["n_group"] = groups
            out["topk_group"] = int(rng.randint(1, groups + 1))
    return out


def sample_quant(rng):
    """A quantization for some samples (mlx-lm's affine, as mlx_lm.convert)."""
    if rng.rand() < 0.2:
        return {"bits": int(rng.choice([4, 8])), "group_size": int(rng.choice([32, 64]))}
    return None


def record(model_type, overrides, seed, case_dir, quant=None):
    """Builds the model with mlx-lm and writes a golden case (no taps).
    Returns the smallest top-2 gap of the greedy steps."""
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    model, config, _ = mg.build_random_model(
        case_dir.name, model_type, overrides, seed, quant, case_dir / "model")
    vocab = mg.vocab_size_of(config)
    tokens = np.random.RandomState(seed).randint(1, vocab, size=mg.PROMPT_LEN).astype(np.int32)
    split = min(mg.PREFILL_SPLIT, len(tokens) - 1)
    logits = mg.forward_logits(model, tokens)
    pd = mg.prefill_decode_logits(model, tokens, split)
    greedy = mg.greedy_tokens(model, tokens, GREEDY)
    replay = mg.forward_logits(model, np.concatenate([tokens, greedy[:-1]]))[len(tokens) - 1:]
    top2 = np.sort(replay, axis=-1)[:, -2:]
    margin = float(np.min(top2[:, 1] - top2[:, 0]))
    if not (np.all(np.isfinite(logits)) and np.all(np.isfinite(pd))):
        raise ValueError("mlx-lm gives non-finite logits")
    mx.save_safetensors(str(case_dir / "golden.safetensors"), {
        "tokens": mx.array(tokens, dtype=mx.int32),
        "logits": mx.array(logits, dtype=mx.float32),
        "prefill_decode_logits": mx.array(pd, dtype=mx.float32),
        "greedy": mx.array(greedy, dtype=mx.int32),
    })
    meta = {"case": case_dir.name, "model_type": model_type, "seed": seed, "dtype": "float32",
            "quantization": quant, "prompt_len": len(tokens), "prefill_split": split,
            "greedy_tokens": GREEDY, "taps": [], "overrides": overrides}
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return margin


def record_encoder(model_type, overrides, seed, case_dir):
    """An encoder's case: mlx-embeddings' last hidden states for one input."""
    if case_dir.exists():
        shutil.rmtree(case_dir)
    (case_dir / "model").mkdir(parents=True)
    config = {**ENCODERS[model_type], **overrides}
    config = {k: v for k, v in config.items() if v is not None}
    module = embeddings_module(model_type)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.eval()  # no dropout
    model.set_dtype(mx.float32)
    mg.randomize_parameters(model, seed)
    mx.save_safetensors(str(case_dir / "model" / "model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    (case_dir / "model" / "config.json").write_text(json.dumps(config, indent=2))
    tokens = np.random.RandomState(seed).randint(1, config["vocab_size"], size=mg.PROMPT_LEN)
    out = np.array(model(mx.array(tokens[None].astype(np.int32))).last_hidden_state[0])
    if not np.all(np.isfinite(out)):
        raise ValueError("mlx-embeddings gives non-finite outputs")
    mx.save_safetensors(str(case_dir / "golden.safetensors"), {
        "tokens": mx.array(tokens, dtype=mx.int32),
        "logits": mx.array(out, dtype=mx.float32),
    })
    meta = {"case": case_dir.name, "model_type": model_type, "seed": seed, "dtype": "float32",
            "quantization": None, "encoder": True, "taps": [], "overrides": overrides}
    (case_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return float("inf")


def judge(lmspec, case_dir, keys):
    """lmspec's verdict on a recorded case: (outcome, detail)."""
    run = subprocess.run([lmspec, "golden", str(case_dir)], capture_output=True, text=True,
                         timeout=300)
    if run.returncode == 0:
        return "match", ""
    # A case lmspec cannot run: an "error:" line on stderr, or (since
    # `lmspec golden` runs the remaining cases on) its row's "ERROR: ..."
    # on stdout.
    errors = [line for line in run.stderr.strip().splitlines() if line.startswith("error:")]
    errors += ["error: " + line.split(" ERROR: ", 1)[1] for line in run.stdout.splitlines()
               if " ERROR: " in line]
    if errors:
        message = errors[0]
        if any(f"config.json: {k}" in message or f"config.json: {k}," in message
               or f" {k}: " in message or f"{k} = " in message for k in keys):
            return "refused", message
        return "UNCLEAR", message
    row = [line for line in run.stdout.splitlines() if "FAIL" in line or "fail" in line]
    return "MISMATCH", (row[-1] if row else run.stdout.strip()[-300:])


def attempt(lmspec, model_type, overrides, seed, case_dir, quant=None, tries=6, text_base=None):
    """Records and judges one sample; None when mlx-lm rejects the config."""
    config = config_overrides(overrides, text_base)
    for k in range(tries):
        try:
            if model_type in ENCODERS:
                margin = record_encoder(model_type, config, seed + 1000 * k, case_dir)
            else:
                margin = record(model_type, config, seed + 1000 * k, case_dir, quant)
        except Exception as e:  # the reference's own refusal: not a sample
            return None, f"{type(e).__name__}: {e}"
        if margin >= mg.MIN_GREEDY_MARGIN:
            return judge(lmspec, case_dir, set_keys(overrides)), ""
    return None, "greedy near-ties with every seed tried"


def minimise(lmspec, model_type, overrides, seed, case_dir, outcome, quant=None, text_base=None):
    """The keys that keep the failure when the others go back to the base."""
    keys = dict(overrides)
    for key in list(keys):
        trial = {k: v for k, v in keys.items() if k != key}
        result, _ = attempt(lmspec, model_type, trial, seed, case_dir, quant, text_base=text_base)
        if result is not None and result[0] == outcome:
            keys = trial
    return keys


def claimed_types(line):
    """The model types of one `lmspec spec list` row: the comma-separated
    list after the spec's name ("llama, mistral, iquestcoder, xverse")."""
    types = []
    for word in line.split()[1:]:
        types.append(word.rstrip(","))
        if not word.endswith(","):
            break
    return types


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-type", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--types", default="", help="comma-separated model types (default: all claimed)")
    parser.add_argument("--lmspec", default="target/debug/lmspec")
    parser.add_argument("--keep", help="keep every case folder under this directory")
    parser.add_argument("--verbose", action="store_true", help="print each refusal")
    args = parser.parse_args(argv)

    claimed = subprocess.run([args.lmspec, "spec", "list"], capture_output=True, text=True,
                             check=True).stdout
    types = sorted({t for line in claimed.splitlines() for t in claimed_types(line)
                    if t in ENCODERS or base_case(t)})
    if args.types:
        types = [t for t in args.types.split(",") if t]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lmspec-fuzz-configs-"))
    totals = {"match": 0, "refused": 0, "MISMATCH": 0, "UNCLEAR": 0}
    failures = []
    start = time.time()
    for model_type in types:
        if model_type in ENCODERS:
            case, base = {"config": {}}, dict(ENCODERS[model_type])
        else:
            case = base_case(model_type)
            base = mg.build_config(model_type, case.get("config", {}))
        fields = reference_fields(model_type)
        text = text_reference(model_type, base)
        prefix, text_base = "", None
        if text is not None:  # a VLM wrapper: its text model's keys
            prefix, fields, text_base = text
            base = text_base
        rng = np.random.RandomState([args.seed, sum(map(ord, model_type))])
        counts = dict.fromkeys(totals, 0)
        rejected, k = 0, 0
        while sum(counts.values()) < args.per_type and rejected < 10 * args.per_type:
            drawn = sample(rng, model_type, fields, base)
            overrides = {**case.get("config", {}), **{prefix + key: v for key, v in drawn.items()}}
            quant = None if model_type in ENCODERS else sample_quant(rng)
            seed = int(rng.randint(1 << 30))
            case_dir = work / f"{model_type}-{k:03d}"
            k += 1
            result, why = attempt(args.lmspec, model_type, overrides, seed, case_dir, quant,
                                  text_base=text_base)
            if result is None:
                rejected += 1
                if args.verbose:
                    print(f"  reference rejected {model_type}: {str(why)[:300]}")
                continue
            outcome, detail = result
            counts[outcome] += 1
            if args.verbose and outcome == "refused":
                print(f"  refused {model_type}: {detail[:300]}")
            if outcome in ("MISMATCH", "UNCLEAR"):
                keys = minimise(args.lmspec, model_type, overrides, seed, case_dir, outcome, quant,
                                text_base=text_base)
                if quant:
                    keys["(quantization)"] = quant
                failures.append((model_type, outcome, keys, detail))
        for o in totals:
            totals[o] += counts[o]
        print(f"{model_type:14} " + "  ".join(f"{o} {n}" for o, n in counts.items())
              + f"  (reference rejected {rejected})", flush=True)
    print(f"\n{sum(totals.values())} samples in {time.time() - start:.0f} s: "
          + ", ".join(f"{n} {o}" for o, n in totals.items()))
    for model_type, outcome, keys, detail in failures:
        print(f"{outcome} {model_type}: {json.dumps(keys)}\n    {detail}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
