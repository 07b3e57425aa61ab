"""MLX's host cost per primitive, by kind: the time `mx.async_eval` takes to
encode a chain of N primitives of one kind (launch), beside the time Python
took to record them (build). Decoding a small model on a GPU is bound by
this cost (docs/benchmarks.md), so the table says which primitives a decode
step pays for and what a step of a given census costs at the least.

Each row: a chain of N operations on a one-row activation of the 1B llama's
width (decode shapes), timed over REPEAT evaluations after a warm-up, median
per primitive in microseconds. `compiled` rows wrap the same chain in
`mx.compile`; `nograph` reruns need MLX_USE_CUDA_GRAPHS=0 set by the caller.

    python3 porting-tools/python/gpu_primitive_cost.py [--n 200] [--repeat 7]
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

W = 2048  # the 1B llama's hidden width


def chains(n):
    """name -> (inputs, fn(inputs) -> output); fn applies n primitives."""
    x = mx.random.normal((1, 1, W)).astype(mx.bfloat16)
    w = (mx.random.normal((1, W, W)) * 0.02).astype(mx.bfloat16)
    g = mx.ones((W,), dtype=mx.bfloat16)
    cache = mx.zeros((1, 8, 640, 64), dtype=mx.bfloat16)
    kv = mx.random.normal((1, 8, 1, 64)).astype(mx.bfloat16)
    q = mx.random.normal((1, 32, 1, 64)).astype(mx.bfloat16)
    mx.eval(x, w, g, cache, kv, q)

    def reshape(a):
        y = a[0]
        for i in range(n):
            y = y.reshape(1, 32, 1, 64) if i % 2 == 0 else y.reshape(1, 1, W)
        return y

    def add(a):
        y = a[0]
        for _ in range(n):
            y = y + a[0]
        return y

    def matmul(a):
        y = a[0]
        for _ in range(n):
            y = y @ a[1]
        return y

    def rms_norm(a):
        y = a[0]
        for _ in range(n):
            y = mx.fast.rms_norm(y, a[1], 1e-5)
        return y

    def rope(a):
        y = a[0]
        for i in range(n):
            y = mx.fast.rope(y, 64, traditional=False, base=500000.0, scale=1.0, offset=i)
        return y

    def slice_(a):
        # a cache read as decode makes it: the first `len` positions
        return [a[0][:, :, : 100 + i, :] for i in range(n)]

    def slice_update(a):
        # a cache write as mlx-lm makes it: one position, in place
        y = mx.array(a[0])
        for i in range(n):
            y[:, :, i % 640 : i % 640 + 1, :] = a[1]
        return y

    def sdpa(a):
        y = a[0]
        k = a[1][:, :, :512, :]
        for _ in range(n):
            y = mx.fast.scaled_dot_product_attention(y, k, k, scale=0.125)
        return y

    # A custom kernel (`mx.fast.cuda_kernel`): MLX writes its source and
    # hashes it on every call, so its size may matter: one of a few hundred
    # bytes, and the same with a 6 KB header of device functions.
    body = "int i = threadIdx.x + blockIdx.x * blockDim.x; if (i < 2048) y[i] = inp[i];"
    pad = "".join(
        f"__device__ inline float lm_pad_{i}(float v) {{ return v * {i}.0f + 1.0f; }}\n" for i in range(90)
    )

    def custom(header):
        kernel = mx.fast.cuda_kernel(
            name="lm_cost" + str(len(header)), input_names=["inp"], output_names=["y"], source=body, header=header
        )

        def run(a):
            y = a[0]
            for _ in range(n):
                y = kernel(
                    inputs=[y], output_shapes=[(1, 1, W)], output_dtypes=[mx.bfloat16],
                    grid=(W, 1, 1), threadgroup=(256, 1, 1),
                )[0]
            return y

        return run

    kernels = {}
    if hasattr(mx.fast, "cuda_kernel") and mx.default_device() == mx.gpu:
        kernels = {
            "custom_kernel (small source)": ([x], custom("")),
            f"custom_kernel ({len(pad) // 1000} KB header)": ([x], custom(pad)),
        }
    return {
        **kernels,
        "reshape": ([x], reshape),
        "add": ([x], add),
        "matmul_bf16_1x2048x2048": ([x, w], matmul),
        "rms_norm": ([x, g], rms_norm),
        "rope": ([q], rope),
        "slice (cache read)": ([cache], slice_),
        "slice_update (cache write)": ([cache, kv], slice_update),
        "sdpa (decode, 512 keys)": ([q, cache], sdpa),
    }


def time_chain(inputs, fn, repeat, compiled):
    f = mx.compile(fn) if compiled else fn
    out = f(inputs)
    mx.eval(out)
    builds, launches = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = f(inputs)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        builds.append(t1 - t0)
        launches.append(t2 - t1)
    return statistics.median(builds), statistics.median(launches)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--step", action="store_true", help="time whole decode steps instead")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--small", action="store_true", help="a tiny llama (a check of the script)")
    args = ap.parse_args()
    if args.step:
        step_main(args)
        return
    rows = []
    print(f"device {mx.default_device()}, chains of {args.n}, median of {args.repeat}")
    print(f"{'kind':30s} {'compiled':>8s} {'build µs/prim':>14s} {'launch µs/prim':>15s}")
    for name, (inputs, fn) in chains(args.n).items():
        for compiled in (False, True):
            try:
                b, l = time_chain(inputs, fn, args.repeat, compiled)
            except Exception as e:  # noqa: BLE001
                print(f"{name:30s} {str(compiled):>8s} error: {e}")
                continue
            row = {"kind": name, "compiled": compiled, "build_us": b * 1e6 / args.n, "launch_us": l * 1e6 / args.n}
            rows.append(row)
            print(f"{name:30s} {str(compiled):>8s} {row['build_us']:14.2f} {row['launch_us']:15.2f}", flush=True)
    if args.json:
        print(json.dumps(rows))




# --- A whole decode step -------------------------------------------------
# A llama decode step at a given shape (random bfloat16 weights), timed as a
# decode loop times it: build (recording the graph), launch (`async_eval`),
# wait (reading the token). `eager` keeps a cache buffer and reads its first
# `offset + 1` positions per step (a Slice), as lmspec and mlx-lm do; `static`
# reads the whole buffer under a mask, with the position as an array (rope
# offset, the cache write's start), so every step has the same shapes and
# `mx.compile` traces it once.


def make_llama(layers, hidden, heads, kv_heads, inter, vocab, max_len):
    d = hidden // heads
    r = lambda *s: (mx.random.normal(s) * 0.02).astype(mx.bfloat16)  # noqa: E731
    ws = []
    for _ in range(layers):
        ws.append(
            dict(
                n1=mx.ones((hidden,), dtype=mx.bfloat16),
                n2=mx.ones((hidden,), dtype=mx.bfloat16),
                wq=r(hidden, heads * d),
                wk=r(hidden, kv_heads * d),
                wv=r(hidden, kv_heads * d),
                wo=r(heads * d, hidden),
                wg=r(hidden, inter),
                wu=r(hidden, inter),
                wd=r(inter, hidden),
            )
        )
    emb = r(vocab, hidden)
    norm = mx.ones((hidden,), dtype=mx.bfloat16)
    mx.eval(ws, emb, norm)
    caches = [
        (mx.zeros((1, kv_heads, max_len, d), dtype=mx.bfloat16), mx.zeros((1, kv_heads, max_len, d), dtype=mx.bfloat16))
        for _ in range(layers)
    ]
    mx.eval(caches)
    return dict(ws=ws, emb=emb, norm=norm, heads=heads, kv=kv_heads, d=d), caches


def step(m, caches, tok, pos, static):
    """One decode step; pos is an int (eager) or an int32 array (static)."""
    h_, kv_, d = m["heads"], m["kv"], m["d"]
    x = m["emb"][tok].reshape(1, 1, -1)
    new = []
    if static:
        L = caches[0][0].shape[2]
        mask = (mx.arange(L) <= pos).reshape(1, 1, 1, L)
    for w, (kc, vc) in zip(m["ws"], caches):
        h = mx.fast.rms_norm(x, w["n1"], 1e-5)
        q = (h @ w["wq"]).reshape(1, h_, 1, d)
        k = (h @ w["wk"]).reshape(1, kv_, 1, d)
        v = (h @ w["wv"]).reshape(1, kv_, 1, d)
        q = mx.fast.rope(q, d, traditional=False, base=500000.0, scale=1.0, offset=pos)
        k = mx.fast.rope(k, d, traditional=False, base=500000.0, scale=1.0, offset=pos)
        if static:
            start = mx.concatenate([mx.zeros((2,), mx.int32), pos.reshape(1), mx.zeros((1,), mx.int32)])
            kc = mx.slice_update(kc, k, start, [0, 1, 2, 3])
            vc = mx.slice_update(vc, v, start, [0, 1, 2, 3])
            o = mx.fast.scaled_dot_product_attention(q, kc, vc, scale=d**-0.5, mask=mask)
        else:
            kc[:, :, pos : pos + 1, :] = k
            vc[:, :, pos : pos + 1, :] = v
            o = mx.fast.scaled_dot_product_attention(q, kc[:, :, : pos + 1], vc[:, :, : pos + 1], scale=d**-0.5)
        new.append((kc, vc))
        x = x + o.reshape(1, 1, -1) @ w["wo"]
        h = mx.fast.rms_norm(x, w["n2"], 1e-5)
        x = x + (nn_silu(h @ w["wg"]) * (h @ w["wu"])) @ w["wd"]
    x = mx.fast.rms_norm(x, m["norm"], 1e-5)
    logits = x @ m["emb"].T
    return mx.argmax(logits[0, -1]), new


def nn_silu(x):
    return x * mx.sigmoid(x)


def time_steps(m, caches, static, compiled, steps, start):
    if static:
        def f(tok, pos, *flat):
            cs = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]
            t, new = step(m, cs, tok, pos, True)
            return [t] + [a for kv in new for a in kv]
        fn = mx.compile(f) if compiled else f
    tok = mx.array(1)
    build = launch = wait = 0.0
    pending = None
    for i in range(steps + 4):
        if i == 4:
            build = launch = wait = 0.0
        pos = start + i
        t0 = time.perf_counter()
        if static:
            out = fn(tok, mx.array(pos, dtype=mx.int32), *[a for kv in caches for a in kv])
            nxt, flat = out[0], out[1:]
            caches = [(flat[2 * j], flat[2 * j + 1]) for j in range(len(flat) // 2)]
        else:
            nxt, caches = step(m, caches, tok, pos, False)
        t1 = time.perf_counter()
        mx.async_eval(nxt, caches)
        t2 = time.perf_counter()
        if pending is not None:
            pending.item()
        t3 = time.perf_counter()
        build += t1 - t0
        launch += t2 - t1
        wait += t3 - t2
        pending, tok = nxt, nxt
    pending.item()
    return build * 1e6 / steps, launch * 1e6 / steps, wait * 1e6 / steps


def step_main(args):
    shape = dict(layers=16, hidden=2048, heads=32, kv_heads=8, inter=8192, vocab=128256, max_len=1024)
    if args.small:
        shape.update(layers=2, hidden=256, heads=4, kv_heads=2, inter=512, vocab=1000)
    m, caches = make_llama(**shape)
    print(f"decode step of a llama {shape}, {args.steps} steps from position 512")
    print(f"{'variant':24s} {'build µs':>9s} {'launch µs':>10s} {'wait µs':>9s} {'tok/s':>8s}")
    for name, static, compiled in (("eager, growing reads", False, False), ("static, eager", True, False),
                                   ("static, compiled", True, True), ("eager, growing reads", False, False),
                                   ("static, compiled", True, True)):
        b, l, w = time_steps(m, caches, static, compiled, args.steps, 512)
        print(f"{name:24s} {b:9.1f} {l:10.1f} {w:9.1f} {1e6 / (b + l + w):8.1f}", flush=True)


if __name__ == "__main__":
    main()
