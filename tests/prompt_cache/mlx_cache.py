"""mlx-lm's side of the prompt-cache round trips.

  write:    process --tokens with mlx-lm into a fresh cache (a rotating one
            with --max-kv-size; quantized with --kv-bits) and save it with
            mlx-lm's save_prompt_cache.
  continue: load a cache file with mlx-lm's load_prompt_cache, feed --tokens
            and write the last position's logits as a JSON list to --out.
"""
import argparse
import json
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import (
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_lm.utils import load_model


def ids(text):
    return [int(t) for t in text.split(",") if t]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["write", "continue"])
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--cache", help="the cache file (written or read)")
    p.add_argument("--out", help="continue: where the logits go")
    p.add_argument("--max-kv-size", type=int)
    p.add_argument("--kv-bits", type=int)
    p.add_argument("--kv-group-size", type=int, default=64)
    args = p.parse_args()
    model, _ = load_model(Path(args.model))
    tokens = mx.array(ids(args.tokens))[None]
    if args.mode == "write":
        if args.max_kv_size:
            # Models with make_cache ignore make_prompt_cache's max_kv_size.
            cache = [
                RotatingKVCache(max_size=args.max_kv_size, keep=4)
                for _ in model.layers
            ]
        else:
            cache = make_prompt_cache(model)
        model(tokens, cache=cache)
        if args.kv_bits:
            maybe_quantize_kv_cache(cache, 0, args.kv_group_size, args.kv_bits)
        mx.eval([c.state for c in cache])
        save_prompt_cache(
            args.cache, cache, {"model": args.model, "tokenizer_config": "{}"}
        )
    else:
        cache = load_prompt_cache(args.cache)
        logits = model(tokens, cache=cache)[0, -1].astype(mx.float32)
        Path(args.out).write_text(json.dumps(logits.tolist()))


if __name__ == "__main__":
    main()
