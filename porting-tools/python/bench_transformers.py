#!/usr/bin/env python3
"""A Hugging Face transformers baseline for `lmspec bench` on a CUDA GPU.

    bench_transformers.py --model DIR --prompt-tokens 512 --gen-tokens 128 \\
        --repeat 4 [--eager]

DIR is a llama folder as `bench_mlx_lm.py --make-random-llama` writes it
(dense weights; mlx-lm's names are Hugging Face's). The model runs in the
checkpoint's dtype on `cuda` with a static KV cache; unless --eager, the
decode step is compiled the way `generate` compiles it for a static cache
(`torch.compile`, mode "reduce-overhead": CUDA graphs). Two untimed runs
warm up (compilation, graph capture).

Per repeat, the prompt is N seeded-random ids (the same seed per repeat):
`generate(max_new_tokens=1)` timed to the first token (TTFT: the prefill),
then `generate(max_new_tokens=G, min_new_tokens=G)` timed whole, greedy;
decode tok/s = (G - 1) / (whole - TTFT). Both end on a synchronize.
Prints one JSON object: ttft_s, prefill_tps, decode_tps as {median, min,
max}, peak_memory_mb, versions.
"""

import argparse
import json
import statistics
import sys
import time


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--eager", action="store_true", help="no torch.compile (plain eager decode)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to("cuda").eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=g).to("cuda")
    mask = torch.ones_like(prompt)

    def config(n):
        c = GenerationConfig(
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
            eos_token_id=None,
        )
        if args.eager:
            c.disable_compile = True
        return c

    @torch.inference_mode()
    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(prompt, attention_mask=mask, generation_config=config(n))
        torch.cuda.synchronize()
        return time.perf_counter() - t, out[0, args.prompt_tokens:].tolist()

    for _ in range(2):
        run(1)
        run(args.gen_tokens)
    torch.cuda.reset_peak_memory_stats()
    ttft, prefill, decode = [], [], []
    tokens = None
    for _ in range(args.repeat):
        first, _ = run(1)
        whole, ids = run(args.gen_tokens)
        tokens = tokens or ids
        ttft.append(first)
        prefill.append(args.prompt_tokens / first)
        decode.append((args.gen_tokens - 1) / (whole - first))
    print(json.dumps({
        "engine": "transformers" + (" (eager)" if args.eager else " (static cache, torch.compile)"),
        "model": args.model,
        "dtype": str(model.dtype),
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeat": args.repeat,
        "load_s": load_s,
        "ttft_s": stats(ttft),
        "prefill_tps": stats(prefill),
        "decode_tps": stats(decode),
        "decode_tps_all": decode,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 1e6,
        "tokens": tokens,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
