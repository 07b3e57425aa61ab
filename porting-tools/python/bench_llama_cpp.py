#!/usr/bin/env python3
"""llama.cpp's side of ``lmspec bench --against llama.cpp``.

llama.cpp runs through llama-cpp-python, in an environment of its own
(``.ci/llama-cpp-env.sh`` builds it; the test setup does not). Same GGUF,
same prompt ids, same thread count and the same protocol as lmspec's side
(docs/benchmarks.md): per repeat a fresh cache, the prompt but its last
token as one batch, the last token, then greedy decoding one token at a
time, the argmax read back after every step.

Interleaved mode (``--serve``): load once, print a header as one JSON line,
then answer each ``repeat`` line on stdin with one repeat's JSON line.

``peak_memory_mb``: the growth of the process's peak resident memory over
its size before the model was loaded (weights, KV cache, compute buffers).
"""
import argparse
import json
import os
import resource
import sys
import time


def log(msg):
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(args, prompt):
    import llama_cpp
    import numpy as np

    base = rss_mb()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=len(prompt) + args.gen_tokens + 8,
        n_batch=max(len(prompt), 8),
        n_ubatch=max(len(prompt), 8),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        verbose=False,
    )
    vocab = llm.n_vocab()
    if max(prompt) >= vocab or min(prompt) < 0:
        raise SystemExit(f"prompt token ids must lie in [0, {vocab})")
    # The same single-token forward lmspec's load time includes.
    llm.reset()
    llm.eval(prompt[-1:])
    load_s = time.perf_counter() - t0
    log(f"loaded {args.model} in {load_s:.3f} s, {args.threads} threads, llama-cpp-python {llama_cpp.__version__}")
    header = {
        "engine": "llama.cpp",
        "model": args.model,
        "weights": "quantized",
        "device": "cpu",
        "prompt_tokens": len(prompt),
        "gen_tokens": args.gen_tokens,
        "load_s": load_s,
        "decode_graph": {"total": 0, "by_kind": {}},
        "mlx_version": "",
        "llama_cpp_version": llama_cpp.__version__,
        "threads": args.threads,
    }
    return llm, np, base, header


def last_argmax(llm, np):
    """The greedy token of the last evaluated position (its logits are the
    only row llama.cpp computed)."""
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))


def one_repeat(llm, np, base, prompt, gen_tokens):
    llm.reset()
    tokens = []
    t0 = time.perf_counter()
    if len(prompt) > 1:
        llm.eval(prompt[:-1])
    llm.eval(prompt[-1:])
    tokens.append(last_argmax(llm, np))
    t1 = time.perf_counter()
    while len(tokens) < gen_tokens:
        llm.eval(tokens[-1:])
        tokens.append(last_argmax(llm, np))
    t2 = time.perf_counter()
    return {
        "ttft_s": t1 - t0,
        "prefill_tps": len(prompt) / (t1 - t0),
        "decode_tps": (gen_tokens - 1) / (t2 - t1),
        "peak_memory_mb": peak_rss_mb() - base,
        "tokens": tokens,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=".gguf file")
    parser.add_argument("--tokens-file", required=True, help="JSON list of prompt token ids")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--serve", action="store_true", help="interleaved mode (see above)")
    parser.add_argument("--weights", default="quantized", help="accepted for lmspec's call; llama.cpp runs the file as stored")
    args = parser.parse_args(argv)
    with open(args.tokens_file) as f:
        prompt = [int(t) for t in json.load(f)]
    if not prompt or args.gen_tokens < 2:
        raise SystemExit("need a prompt and --gen-tokens of at least 2")
    if not args.model.endswith(".gguf"):
        raise SystemExit(f"{args.model}: llama.cpp reads .gguf files only")
    out = sys.stdout
    llm, np, base, header = load(args, prompt)
    # One untimed repeat, as every engine of `lmspec bench` takes.
    one_repeat(llm, np, base, prompt, args.gen_tokens)
    print(json.dumps(header), file=out, flush=True)
    if not args.serve:
        print(json.dumps(one_repeat(llm, np, base, prompt, args.gen_tokens)), file=out, flush=True)
        return
    for line in sys.stdin:
        command = line.strip()
        if command == "repeat":
            print(json.dumps(one_repeat(llm, np, base, prompt, args.gen_tokens)), file=out, flush=True)
        elif command:
            raise SystemExit(f"unknown command {command!r} (expected 'repeat')")


if __name__ == "__main__":
    main()
