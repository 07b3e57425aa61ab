#!/usr/bin/env python3
"""Tiny encoder goldens: sentence embeddings and reranker scores of small
random-weight (float32, seeded) checkpoints, computed by a reference on the
MLX CPU backend.

Each case is a folder ``goldens/embeddings/CASE/``:

    model/config.json                  Hugging Face config of the type
    model/model.safetensors            weights under the Hugging Face names
    model/tokenizer.json               a tiny WordPiece tokenizer (below)
    model/modules.json, 1_Pooling/config.json, sentence_bert_config.json,
    [2_Dense/, 3_Dense/, config_sentence_transformers.json]
                                       the sentence-transformers files
    reference.json                     per sentence: text, token ids and the
                                       reference embedding (or, for the
                                       reranker: the query, documents, ids,
                                       scores and their order)

References, by model type:

* ``xlm-roberta`` and ``roberta``: ``mlx_embeddings.models.xlm_roberta``
  (mlx-embeddings 0.1.0). mlx-embeddings has no ``roberta`` module; in
  transformers ``XLMRobertaModel`` is ``RobertaModel`` unchanged, so the same
  implementation is the reference for both.
* ``modernbert``: ``mlx_embeddings.models.modernbert.ModernBertModel``
  (alternating global / local band attention, GeGLU, RoPE with two bases).
* ``qwen3`` as an embedder: ``mlx_embeddings.models.qwen3`` (causal, last
  token pooling), with the instruction prompt of
  ``config_sentence_transformers.json`` (``query``) put before each text.
* ``gemma3_text`` as an embedder (EmbeddingGemma):
  ``mlx_embeddings.models.gemma3_text`` (bidirectional on every layer: it
  passes one padding mask to all layers), mean pooling, then the two
  sentence-transformers Dense layers and L2 normalisation.
* ``distilbert`` and ``nomic_bert``: mlx-embeddings has neither, so the
  reference is a faithful NumPy float64 port of the Hugging Face
  definitions: ``transformers.models.distilbert.modeling_distilbert``
  (word + learned position embeddings, LayerNorm eps 1e-12, post-LN
  blocks, exact GELU) and nomic-ai's ``modeling_hf_nomic_bert.py``
  (``NomicBertModel``: word + token-type embeddings, ``emb_ln``, fused
  ``Wqkv``, half-split rotary on all head dims, post-LN blocks,
  ``NomicBertGatedMLP``: ``fc2(fc11(x) * silu(fc12(x)))``).
* reranker (``xlm-roberta`` ``XLMRobertaForSequenceClassification``): the
  mlx-embeddings xlm_roberta encoder, then transformers'
  ``XLMRobertaClassificationHead`` in NumPy on the first token:
  ``out_proj(tanh(dense(h[0])))``, the raw logit.

Pooling, Dense and Normalize follow sentence-transformers
(``models/Pooling.py``, ``Dense.py``, ``Normalize.py``), in NumPy float64 on
the reference's float32 hidden states. Every sentence runs alone (batch of
one, no padding); tokenization is the ``tokenizers`` library on the case's
``tokenizer.json`` with truncation at ``max_seq_length`` (as
sentence-transformers calls the tokenizer).

Tokenizer: a WordPiece vocabulary built here (special tokens of the family,
lowercase BERT normalizer, ASCII characters and ``##`` continuations, a few
non-ASCII characters, and the common words of the sentences), a few KB;
real checkpoints' vocabularies would make the goldens too large.

mlx-embeddings imports ``mlx_vlm.utils.sanitize_weights`` at package import
and mlx-vlm is not installed; the script puts an empty stand-in module in
``sys.modules`` first (no mlx-embeddings code used here calls it).

Usage (from the repository root):

    .venv/bin/python porting-tools/python/make_encoder_goldens.py [--case NAME]
"""

import argparse
import importlib.metadata
import json
import math
import platform
import shutil
import sys
import types
from pathlib import Path

import numpy as np

_vlm = types.ModuleType("mlx_vlm")
_vlm_utils = types.ModuleType("mlx_vlm.utils")
_vlm_utils.sanitize_weights = None
_vlm.utils = _vlm_utils
sys.modules.setdefault("mlx_vlm", _vlm)
sys.modules.setdefault("mlx_vlm.utils", _vlm_utils)

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
OUT_ROOT = REPO_ROOT / "goldens" / "embeddings"
SCRIPT = "porting-tools/python/make_encoder_goldens.py"

MAX_SEQ_LENGTH = 48
HIDDEN = 32
HEADS = 4
LAYERS = 2
INTER = 64
SEED = 0

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "How much does a 3.5 kg bag of rice cost in 2024? About $12.99, I think.",
    "Le café de la gare était très agréable; Grüße aus Köln, 東京は晴れです.",
    "Embeddings map a sentence to a vector so that similar sentences end up close together.",
    "  Leading spaces,\ttabs,\nnewlines   and   repeated   spaces   ",
    "Search, clustering and retrieval use the same vectors.",
    # Past MAX_SEQ_LENGTH tokens: truncated.
    "Rust is a general purpose programming language that emphasizes performance, "
    "type safety and concurrency. It enforces memory safety without a garbage "
    "collector, and its borrow checker tracks the lifetime of all references in a "
    "program during compilation, which is why this sentence is far too long for "
    "the tiny model and must be cut before the end.",
]

QUERY = "how do embeddings help search?"
DOCUMENTS = [
    "Embeddings map a sentence to a vector for search.",
    "The quick brown fox jumps over the lazy dog.",
    "Search engines rank documents by relevance to a query.",
    "Hello!",
    "Rice costs about $12.99 for a 3.5 kg bag.",
    "Vectors that are close together have similar meanings.",
    "Le café de la gare était très agréable.",
    "A reranker scores each query and document pair.",
    "Programming languages enforce memory safety in different ways.",
    "Retrieval uses embeddings to find similar sentences.",
]

WORDS = sorted(set("""
the quick brown fox jumps over lazy dog hello how much does a bag of rice cost in
about i think le de la gare tres embeddings map sentence to vector so that similar
sentences end up close together leading spaces tabs newlines and repeated search
clustering retrieval use same vectors rust is general purpose programming language
emphasizes performance type safety concurrency it enforces memory without garbage
collector its borrow checker tracks lifetime all references program during
compilation which why this far too long for tiny model must be cut before do help
engines rank documents by relevance query have meanings reranker scores each
document pair languages enforce different ways uses find instruct given web
retrieve relevant passages answer
""".split()))
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-$%&/")
EXTRA_CHARS = list("éèüö東京")

FAMILIES = {
    # name: (special tokens in id order, single template, pair template)
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
             "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"),
    "roberta": (["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                "<s> $A </s>", "<s> $A </s> </s> $B </s>"),
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<pad>"],
             "$A <|endoftext|>", "$A $B <|endoftext|>"),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"],
              "<bos> $A <eos>", "<bos> $A $B <eos>"),
}
UNK = {"bert": "[UNK]", "roberta": "<unk>", "qwen": "<unk>", "gemma": "<unk>"}

WEIGHT_STD = 0.15
BIAS_STD = 0.1
NORM_STD = 0.1


def make_tokenizer(family):
    specials, single, pair = FAMILIES[family]
    vocab = {}
    for t in specials + CHARS + EXTRA_CHARS + ["##" + c for c in CHARS] + WORDS:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK[family], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, vocab[t]) for t in specials if t in single or t in pair])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(specials)
    return tok, len(vocab)


def randomize(params, rng, rms_offset=False):
    """Seeded random values for every parameter (norm weights near 1, or
    near 0 for (1 + w) RMS norms)."""
    out = {}
    for name, p in params.items():
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = p.ndim == 1 and any(s in name for s in ("norm", "LayerNorm", "emb_ln"))
        if leaf == "bias":
            v = rng.normal(0, BIAS_STD, shape)
        elif is_norm:
            v = rng.normal(0, NORM_STD, shape) + (0.0 if rms_offset else 1.0)
        else:
            v = rng.normal(0, WEIGHT_STD, shape)
        out[name] = v.astype(np.float32)
    return out


def set_params(model, weights):
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    model.eval()  # dropout off (MLX modules start in training mode)
    mx.eval(model.parameters())


def pool(hidden, mode):
    h = np.asarray(hidden, dtype=np.float64)
    if mode == "mean":
        return h.mean(0)
    if mode == "cls":
        return h[0]
    if mode == "max":
        return h.max(0)
    if mode == "lasttoken":
        return h[-1]
    if mode == "mean_sqrt_len_tokens":
        return h.sum(0) / math.sqrt(h.shape[0])
    if mode == "weightedmean":
        w = np.arange(1, h.shape[0] + 1, dtype=np.float64)[:, None]
        return (h * w).sum(0) / w.sum()
    raise ValueError(mode)


# ---------------------------------------------------------------------------
# NumPy float64 references (types mlx-embeddings lacks).


def np_ln(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * g
    return y + b if b is not None else y


def np_gelu(x):
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float64])(x / math.sqrt(2.0)))


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_attention(q, k, v):
    """q, k, v [H, T, D]; bidirectional, no mask (one unpadded sentence)."""
    s = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return p @ v


def distilbert_hidden(w, cfg, ids):
    """transformers DistilBertModel (eval), last hidden state [T, dim]."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    t, d, nh = len(ids), cfg["dim"], cfg["n_heads"]
    hd = d // nh
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t]
    x = np_ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], 1e-12)

    def lin(v, n):
        return v @ w[n + ".weight"].T + w[n + ".bias"]

    for i in range(cfg["n_layers"]):
        p = f"transformer.layer.{i}."
        heads = [lin(x, p + "attention." + n).reshape(t, nh, hd).transpose(1, 0, 2)
                 for n in ("q_lin", "k_lin", "v_lin")]
        ctx = np_attention(*heads).transpose(1, 0, 2).reshape(t, d)
        sa = np_ln(lin(ctx, p + "attention.out_lin") + x,
                   w[p + "sa_layer_norm.weight"], w[p + "sa_layer_norm.bias"], 1e-12)
        ff = lin(np_gelu(lin(sa, p + "ffn.lin1")), p + "ffn.lin2")
        x = np_ln(ff + sa, w[p + "output_layer_norm.weight"], w[p + "output_layer_norm.bias"], 1e-12)
    return x


def np_rope_half(x, base):
    """Half-split rotary over all dims of x [H, T, D] (positions 0..T-1)."""
    _, t, d = x.shape
    inv = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def nomic_hidden(w, cfg, ids):
    """nomic-ai NomicBertModel (eval, post-LN, swiglu), last hidden [T, n_embd]."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    t, d, nh = len(ids), cfg["n_embd"], cfg["n_head"]
    hd = d // nh
    eps = cfg["layer_norm_epsilon"]
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
    x = np_ln(x, w["emb_ln.weight"], w["emb_ln.bias"], eps)
    for i in range(cfg["n_layer"]):
        p = f"encoder.layers.{i}."
        qkv = x @ w[p + "attn.Wqkv.weight"].T
        q, k, v = (qkv[:, j * d:(j + 1) * d].reshape(t, nh, hd).transpose(1, 0, 2) for j in range(3))
        q, k = np_rope_half(q, cfg["rotary_emb_base"]), np_rope_half(k, cfg["rotary_emb_base"])
        ctx = np_attention(q, k, v).transpose(1, 0, 2).reshape(t, d)
        a = ctx @ w[p + "attn.out_proj.weight"].T
        h = np_ln(a + x, w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
        y = (h @ w[p + "mlp.fc11.weight"].T) * np_silu(h @ w[p + "mlp.fc12.weight"].T)
        m = y @ w[p + "mlp.fc2.weight"].T
        x = np_ln(m + h, w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
    return x


# ---------------------------------------------------------------------------
# Cases.


def case_xlm_roberta(rng, model_type="xlm-roberta", pooling="mean", normalize=True):
    from mlx_embeddings.models import xlm_roberta
    vocab_tok = make_tokenizer("roberta")
    cfg = {
        "architectures": ["XLMRobertaModel"],
        "model_type": model_type, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "intermediate_size": INTER, "hidden_act": "gelu",
        "max_position_embeddings": MAX_SEQ_LENGTH + 2, "type_vocab_size": 1,
        "vocab_size": vocab_tok[1], "layer_norm_eps": 1e-5, "pad_token_id": 1,
        "bos_token_id": 0, "eos_token_id": 2, "position_embedding_type": "absolute",
    }
    model = xlm_roberta.Model(xlm_roberta.ModelArgs(**{k: v for k, v in cfg.items()
                                                      if k not in ("architectures", "hidden_act",
                                                                   "bos_token_id", "eos_token_id")}))
    w = randomize(dict(tree_flatten(model.parameters())), rng)
    set_params(model, w)

    def hidden(ids):
        out = model(mx.array([ids]), attention_mask=mx.ones((1, len(ids))))
        return np.array(out.last_hidden_state[0])

    return dict(config=cfg, weights=w, tokenizer=vocab_tok[0], hidden=hidden,
                pooling=pooling, normalize=normalize,
                reference=f"mlx_embeddings.models.xlm_roberta.Model (model_type {model_type})")


def case_roberta(rng):
    c = case_xlm_roberta(rng, model_type="roberta", pooling="cls", normalize=False)
    c["config"]["architectures"] = ["RobertaModel"]
    return c


def case_modernbert(rng):
    from mlx_embeddings.models import modernbert
    tok, vocab = make_tokenizer("bert")
    cfg = {
        "architectures": ["ModernBertModel"], "model_type": "modernbert",
        "vocab_size": vocab, "hidden_size": HIDDEN, "num_hidden_layers": 3,
        "num_attention_heads": HEADS, "intermediate_size": 48, "max_position_embeddings": 128,
        "norm_eps": 1e-5, "norm_bias": False, "global_rope_theta": 160000.0,
        "local_rope_theta": 10000.0, "local_attention": 8, "global_attn_every_n_layers": 2,
        "attention_bias": False, "mlp_bias": False, "hidden_activation": "gelu",
        "pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3,
    }
    args = modernbert.ModelArgs(**{k: v for k, v in cfg.items()
                                   if k in modernbert.ModelArgs.__dataclass_fields__})
    model = modernbert.ModernBertModel(args)
    w = randomize(dict(tree_flatten(model.parameters())), rng)
    set_params(model, w)

    def hidden(ids):
        out = model(mx.array([ids]), attention_mask=mx.ones((1, len(ids))))
        return np.array(out["last_hidden_state"][0])

    return dict(config=cfg, weights=w, tokenizer=tok, hidden=hidden,
                pooling="mean", normalize=True,
                reference="mlx_embeddings.models.modernbert.ModernBertModel")


def case_qwen3_embedding(rng):
    from mlx_embeddings.models import qwen3
    tok, vocab = make_tokenizer("qwen")
    cfg = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "intermediate_size": INTER,
        "num_attention_heads": HEADS, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": True,
        "attention_bias": False, "hidden_act": "silu",
    }
    model = qwen3.Model(qwen3.ModelArgs(**{k: v for k, v in cfg.items()
                                           if k in qwen3.ModelArgs.__dataclass_fields__}))
    w = randomize(dict(tree_flatten(model.parameters())), rng, rms_offset=False)
    set_params(model, w)

    def hidden(ids):
        return np.array(model.model(mx.array([ids]), attention_mask=mx.ones((1, len(ids))))[0])

    # Saved as Qwen3Model (sentence-transformers' checkpoint): no "model." prefix.
    w = {k.removeprefix("model."): v for k, v in w.items()}
    prompts = {"query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
               "document": ""}
    return dict(config=cfg, weights=w, tokenizer=tok, hidden=hidden,
                pooling="lasttoken", normalize=True, prompts=prompts, prompt="query",
                reference="mlx_embeddings.models.qwen3.Qwen3Model (causal), last token")


def case_gemma3_embedding(rng):
    from mlx_embeddings.models import gemma3_text
    from mlx_lm.models.gemma3_text import ModelArgs
    tok, vocab = make_tokenizer("gemma")
    cfg = {
        "architectures": ["Gemma3TextModel"], "model_type": "gemma3_text",
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "intermediate_size": INTER,
        "num_attention_heads": HEADS, "num_key_value_heads": 1, "head_dim": 16,
        "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "sliding_window": 512, "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 16, "max_position_embeddings": 2048,
        "use_bidirectional_attention": True, "hidden_activation": "gelu_pytorch_tanh",
    }
    args = ModelArgs.from_dict(cfg)
    model = gemma3_text.Model(args)
    params = dict(tree_flatten(model.parameters()))
    w = randomize(params, rng, rms_offset=True)
    set_params(model, w)

    def hidden(ids):
        am = mx.ones((1, len(ids)))
        mask = mx.where(model.get_extended_attention_mask(am, (1, len(ids))).astype(mx.bool_), 0.0, -mx.inf)
        return np.array(model.model(mx.array([ids]), mask.astype(mx.float32))[0])

    dense = [(w.pop("dense.0.weight"), "2_Dense"), (w.pop("dense.1.weight"), "3_Dense")]
    w = {k.removeprefix("model."): v for k, v in w.items()}
    return dict(config=cfg, weights=w, tokenizer=tok, hidden=hidden,
                pooling="mean", normalize=True, dense=dense,
                reference="mlx_embeddings.models.gemma3_text.Gemma3Model (bidirectional) "
                          "+ sentence-transformers Dense x2 + Normalize")


def case_distilbert(rng):
    tok, vocab = make_tokenizer("bert")
    cfg = {
        "architectures": ["DistilBertModel"], "model_type": "distilbert",
        "vocab_size": vocab, "dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS,
        "hidden_dim": INTER, "activation": "gelu", "max_position_embeddings": 64,
        "sinusoidal_pos_embds": False, "pad_token_id": 0, "dropout": 0.1,
        "attention_dropout": 0.1, "initializer_range": 0.02,
    }
    shapes = {
        "embeddings.word_embeddings.weight": (vocab, HIDDEN),
        "embeddings.position_embeddings.weight": (64, HIDDEN),
        "embeddings.LayerNorm.weight": (HIDDEN,), "embeddings.LayerNorm.bias": (HIDDEN,),
    }
    for i in range(LAYERS):
        p = f"transformer.layer.{i}."
        for n in ("q_lin", "k_lin", "v_lin", "out_lin"):
            shapes[p + f"attention.{n}.weight"] = (HIDDEN, HIDDEN)
            shapes[p + f"attention.{n}.bias"] = (HIDDEN,)
        shapes[p + "ffn.lin1.weight"], shapes[p + "ffn.lin1.bias"] = (INTER, HIDDEN), (INTER,)
        shapes[p + "ffn.lin2.weight"], shapes[p + "ffn.lin2.bias"] = (HIDDEN, INTER), (HIDDEN,)
        for n in ("sa_layer_norm", "output_layer_norm"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (HIDDEN,), (HIDDEN,)
    w = randomize({k: np.zeros(s, np.float32) for k, s in shapes.items()}, rng)
    return dict(config=cfg, weights=w, tokenizer=tok,
                hidden=lambda ids: distilbert_hidden(w, cfg, ids),
                pooling="max", normalize=False,
                reference="NumPy float64 port of transformers DistilBertModel")


def case_nomic_bert(rng):
    tok, vocab = make_tokenizer("bert")
    cfg = {
        "architectures": ["NomicBertModel"], "model_type": "nomic_bert",
        "vocab_size": vocab, "n_embd": HIDDEN, "n_head": HEADS, "n_layer": LAYERS,
        "n_inner": INTER, "n_positions": 2048, "activation_function": "swiglu",
        "rotary_emb_fraction": 1.0, "rotary_emb_base": 1000, "rotary_emb_interleaved": False,
        "rotary_scaling_factor": None, "layer_norm_epsilon": 1e-12, "prenorm": False,
        "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
        "type_vocab_size": 2, "causal": False, "scale_attn_weights": True,
    }
    shapes = {
        "embeddings.word_embeddings.weight": (vocab, HIDDEN),
        "embeddings.token_type_embeddings.weight": (2, HIDDEN),
        "emb_ln.weight": (HIDDEN,), "emb_ln.bias": (HIDDEN,),
    }
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        shapes[p + "attn.Wqkv.weight"] = (3 * HIDDEN, HIDDEN)
        shapes[p + "attn.out_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.fc11.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.fc12.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.fc2.weight"] = (HIDDEN, INTER)
        for n in ("norm1", "norm2"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (HIDDEN,), (HIDDEN,)
    w = randomize({k: np.zeros(s, np.float32) for k, s in shapes.items()}, rng)
    return dict(config=cfg, weights=w, tokenizer=tok,
                hidden=lambda ids: nomic_hidden(w, cfg, ids),
                pooling="mean_sqrt_len_tokens", normalize=True,
                reference="NumPy float64 port of nomic-ai NomicBertModel")


CASES = {
    "xlm_roberta": case_xlm_roberta,
    "roberta": case_roberta,
    "modernbert": case_modernbert,
    "qwen3_embedding": case_qwen3_embedding,
    "gemma3_embedding": case_gemma3_embedding,
    "distilbert": case_distilbert,
    "nomic_bert": case_nomic_bert,
}


def save_safetensors(path, tensors):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(tensors.items())},
              str(path))


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def versions():
    def v(d):
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"mlx": mx.__version__, "mlx_embeddings": v("mlx-embeddings"), "mlx_lm": v("mlx-lm"),
            "tokenizers": v("tokenizers"), "numpy": np.__version__,
            "python": platform.python_version(), "device": "mlx cpu", "dtype": "float32"}


def st_files(mdir, c):
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    for k, (weight, folder) in enumerate(c.get("dense", [])):
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": folder,
                        "type": "sentence_transformers.models.Dense"})
        (mdir / folder).mkdir(parents=True, exist_ok=True)
        write_json(mdir / folder / "config.json", {
            "in_features": int(weight.shape[1]), "out_features": int(weight.shape[0]),
            "bias": False, "activation_function": "torch.nn.modules.linear.Identity"})
        save_safetensors(mdir / folder / "model.safetensors", {"linear.weight": weight})
    if c["normalize"]:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    write_json(mdir / "modules.json", modules)
    dim = c["config"].get("hidden_size", c["config"].get("dim", c["config"].get("n_embd")))
    flags = {f"pooling_mode_{k}": c["pooling"] == v for k, v in [
        ("cls_token", "cls"), ("mean_tokens", "mean"), ("max_tokens", "max"),
        ("mean_sqrt_len_tokens", "mean_sqrt_len_tokens"), ("weightedmean_tokens", "weightedmean"),
        ("lasttoken", "lasttoken")]}
    write_json(mdir / "1_Pooling" / "config.json",
               {"word_embedding_dimension": dim, **flags, "include_prompt": True})
    write_json(mdir / "sentence_bert_config.json",
               {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False})
    if "prompts" in c:
        write_json(mdir / "config_sentence_transformers.json",
                   {"prompts": c["prompts"], "default_prompt_name": None,
                    "similarity_fn_name": "cosine"})


def make_case(name):
    rng = np.random.default_rng(SEED)
    mx.random.seed(SEED)
    c = CASES[name](rng)
    out = OUT_ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    mdir = out / "model"
    mdir.mkdir(parents=True)
    write_json(mdir / "config.json", c["config"])
    save_safetensors(mdir / "model.safetensors", c["weights"])
    tok = c["tokenizer"]
    tok.save(str(mdir / "tokenizer.json"))
    st_files(mdir, c)
    untruncated = Tokenizer.from_str(tok.to_str())
    tok.enable_truncation(MAX_SEQ_LENGTH)
    prefix = c.get("prompts", {}).get(c.get("prompt"), "")
    records = []
    for text in SENTENCES:
        enc = tok.encode(prefix + text)
        ids = enc.ids
        full = len(untruncated.encode(prefix + text).ids)
        h = c["hidden"](ids)
        v = pool(h, c["pooling"])
        for weight, _ in c.get("dense", []):
            v = np.asarray(weight, np.float64) @ v
        if c["normalize"]:
            v = v / max(np.linalg.norm(v), 1e-12)
        records.append({"text": text, "n_tokens_untruncated": full, "input_ids": ids,
                        "embedding": [float(np.float32(x)) for x in v]})
    assert any(r["n_tokens_untruncated"] > MAX_SEQ_LENGTH for r in records)
    doc = {
        "description": f"tiny random {c['config']['model_type']} embedder (seed {SEED}); "
                       f"pooling {c['pooling']}, normalize {c['normalize']}, "
                       f"dense layers {len(c.get('dense', []))}, one sentence per forward",
        "generator": f".venv/bin/python {SCRIPT} --case {name}",
        "reference": c["reference"],
        "prompt": c.get("prompt"),
        "max_seq_length": MAX_SEQ_LENGTH,
        "versions": versions(),
        "sentences": records,
    }
    write_json(out / "reference.json", doc)
    print(f"{name}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file())} bytes")


def make_reranker():
    from mlx_embeddings.models import xlm_roberta
    rng = np.random.default_rng(SEED + 1)
    tok, vocab = make_tokenizer("roberta")
    cfg = {
        "architectures": ["XLMRobertaForSequenceClassification"], "model_type": "xlm-roberta",
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "intermediate_size": INTER, "hidden_act": "gelu", "max_position_embeddings": 130,
        "type_vocab_size": 1, "vocab_size": vocab, "layer_norm_eps": 1e-5, "pad_token_id": 1,
        "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
    }
    model = xlm_roberta.Model(xlm_roberta.ModelArgs(
        model_type="xlm-roberta", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        intermediate_size=INTER, num_attention_heads=HEADS, max_position_embeddings=130,
        vocab_size=vocab, layer_norm_eps=1e-5, add_pooling_layer=False, type_vocab_size=1,
        pad_token_id=1))
    w = randomize(dict(tree_flatten(model.parameters())), rng)
    set_params(model, w)
    head = {"classifier.dense.weight": rng.normal(0, 0.3, (HIDDEN, HIDDEN)).astype(np.float32),
            "classifier.dense.bias": rng.normal(0, 0.1, (HIDDEN,)).astype(np.float32),
            "classifier.out_proj.weight": rng.normal(0, 0.5, (1, HIDDEN)).astype(np.float32),
            "classifier.out_proj.bias": rng.normal(0, 0.1, (1,)).astype(np.float32)}
    out = OUT_ROOT / "reranker"
    shutil.rmtree(out, ignore_errors=True)
    mdir = out / "model"
    mdir.mkdir(parents=True)
    write_json(mdir / "config.json", cfg)
    save_safetensors(mdir / "model.safetensors",
                     {**{"roberta." + k: v for k, v in w.items()}, **head})
    tok.save(str(mdir / "tokenizer.json"))
    max_len = 128
    tok.enable_truncation(max_len)
    scores, ids_all = [], []
    for d in DOCUMENTS:
        ids = tok.encode(QUERY, d).ids
        h = np.array(model(mx.array([ids]), attention_mask=mx.ones((1, len(ids)))).last_hidden_state[0])
        x = np.tanh(h[0].astype(np.float64) @ head["classifier.dense.weight"].T.astype(np.float64)
                    + head["classifier.dense.bias"])
        s = x @ head["classifier.out_proj.weight"][0].astype(np.float64) + float(head["classifier.out_proj.bias"][0])
        scores.append(float(np.float32(s)))
        ids_all.append(ids)
    order = sorted(range(len(scores)), key=lambda k: -scores[k])
    gaps = sorted(abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1:])
    doc = {
        "description": "tiny random XLMRobertaForSequenceClassification cross-encoder "
                       f"(seed {SEED + 1}); score = the raw logit of the first token's head",
        "generator": f".venv/bin/python {SCRIPT} --case reranker",
        "reference": "mlx_embeddings.models.xlm_roberta.Model (no pooler) + NumPy "
                     "transformers XLMRobertaClassificationHead: out_proj(tanh(dense(h[0])))",
        "versions": versions(),
        "query": QUERY,
        "documents": DOCUMENTS,
        "input_ids": ids_all,
        "scores": scores,
        "order": order,
        "smallest_score_gap": gaps[0],
    }
    write_json(out / "reference.json", doc)
    print(f"reranker: order {order}, smallest gap {gaps[0]:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=[*CASES, "reranker"], action="append")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    for name in args.case or [*CASES, "reranker"]:
        if name == "reranker":
            make_reranker()
        else:
            make_case(name)


if __name__ == "__main__":
    main()
