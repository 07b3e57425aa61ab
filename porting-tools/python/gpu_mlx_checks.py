"""Checks of single MLX operations on the GPU against the same operations on
the CPU (one process, the same libmlx), for the cases where lmspec's golden
cases disagreed between the two backends (docs/gpu.md).

Each check prints `name  max|gpu - cpu| / max|cpu|`; a float32 operation on
the GPU should stay near 1e-6 (with `MLX_ENABLE_TF32=0`) or 1e-3 (TF32
matmuls); a wrong kernel shows as O(1).

    MLX_ENABLE_TF32=0 python3 porting-tools/python/gpu_mlx_checks.py
"""

import sys

import mlx.core as mx

# Without a GPU both sides run on the CPU (a check of the script itself).
GPU, CPU = (mx.gpu if mx.is_available(mx.gpu) else mx.cpu), mx.cpu
RESULTS = []


def rel(a, b):
    a = a.astype(mx.float32)
    b = b.astype(mx.float32)
    d = mx.max(mx.abs(a - b)).item()
    r = mx.max(mx.abs(b)).item()
    return d / r if r else d


def check(name, fn, *args):
    """Runs fn(*args) on both devices; args are host-made arrays."""
    try:
        with mx.stream(CPU):
            want = fn(*args)
            mx.eval(want)
        with mx.stream(GPU):
            got = fn(*args)
            mx.eval(got)
        if not isinstance(want, (list, tuple)):
            want, got = [want], [got]
        r = max(rel(g, w) for g, w in zip(got, want))
        RESULTS.append((name, r))
        print(f"{name:60s} {r:.3e}{'  <-- WRONG' if r > 1e-2 else ''}", flush=True)
    except Exception as e:  # noqa: BLE001
        RESULTS.append((name, float("inf")))
        print(f"{name:60s} error: {e}", flush=True)


def rope_checks():
    H, K, D = 4, 2, 16
    for T in (1, 5):
        x = mx.random.normal((1, T, (H + 2 * K) * D))
        mx.eval(x)

        def heads(q, n):
            return q.reshape(1, T, n, D).transpose(0, 2, 1, 3)

        def by_split(x):
            q, k, v = mx.split(x, [H * D, (H + K) * D], axis=-1)
            return mx.fast.rope(heads(q, H), D, traditional=False, base=10000.0, scale=1.0, offset=3)

        def by_split_k(x):
            q, k, v = mx.split(x, [H * D, (H + K) * D], axis=-1)
            return mx.fast.rope(heads(k, K), D, traditional=False, base=10000.0, scale=1.0, offset=3)

        def by_slice(x):
            q = x[..., : H * D]
            return mx.fast.rope(heads(q, H), D, traditional=False, base=10000.0, scale=1.0, offset=3)

        def by_slice_k(x):
            k = x[..., H * D : (H + K) * D]
            return mx.fast.rope(heads(k, K), D, traditional=False, base=10000.0, scale=1.0, offset=3)

        def split_only(x):
            q, k, v = mx.split(x, [H * D, (H + K) * D], axis=-1)
            return [heads(q, H) * 1, heads(k, K) * 1, v * 1]

        def split_reshape_contig(x):
            q, k, v = mx.split(x, [H * D, (H + K) * D], axis=-1)
            return mx.contiguous(heads(k, K))

        check(f"split -> heads -> fast.rope (q) T={T}", by_split, x)
        check(f"split -> heads -> fast.rope (k) T={T}", by_split_k, x)
        check(f"slice -> heads -> fast.rope (q) T={T}", by_slice, x)
        check(f"slice -> heads -> fast.rope (k) T={T}", by_slice_k, x)
        check(f"split -> heads -> multiply T={T}", split_only, x)
        check(f"split -> heads -> contiguous (k) T={T}", split_reshape_contig, x)


def quantized_checks():
    for bits, gs, n, k in [(8, 64, 4, 64), (8, 64, 8, 64), (4, 32, 32, 64), (4, 32, 64, 32), (4, 64, 128, 64), (4, 64, 256, 256)]:
        w = mx.random.normal((n, k)) * 0.1
        wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
        for m in (1, 4):
            x = mx.random.normal((1, m, k))
            mx.eval(wq, s, b, x)
            check(
                f"quantized_matmul {bits}b g{gs} [{m}x{k}] x [{n}x{k}]^T",
                lambda x, wq, s, b: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits),
                x, wq, s, b,
            )
    E, topk = 4, 2
    for bits, gs, n, k in [(4, 32, 32, 64), (4, 32, 64, 32), (4, 64, 128, 64), (4, 64, 256, 256), (8, 64, 64, 64)]:
        w = mx.random.normal((E, n, k)) * 0.1
        wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
        for m in (1, 4):
            x = mx.random.normal((1, m, 1, 1, k))
            idx = mx.random.randint(0, E, (1, m, topk)).astype(mx.uint32)
            mx.eval(wq, s, b, x, idx)
            for srt in (False, True):
                def gq(x, wq, s, b, idx, srt=srt):
                    if srt:
                        flat = idx.flatten()
                        order = mx.argsort(flat)
                        xi = x.flatten(0, -3)[order // topk]
                        y = mx.gather_qmm(xi, wq, s, b, rhs_indices=flat[order], transpose=True,
                                          group_size=gs, bits=bits, sorted_indices=True)
                        inv = mx.argsort(order)
                        return y[inv]
                    return mx.gather_qmm(x, wq, s, b, rhs_indices=idx, transpose=True,
                                         group_size=gs, bits=bits)

                check(f"gather_qmm {bits}b g{gs} E{E} m={m} [{n}x{k}] sorted={srt}", gq, x, wq, s, b, idx)

            def deq(x, wq, s, b, idx):
                wd = mx.dequantize(wq, s, b, group_size=gs, bits=bits)
                return mx.gather_mm(x, wd.swapaxes(-1, -2), rhs_indices=idx)

            check(f"dequantize + gather_mm {bits}b g{gs} E{E} m={m} [{n}x{k}]", deq, x, wq, s, b, idx)


def ssm_checks():
    for s in (1, 4):
        ssm_chunk_checks(s)
    conv_checks()


def ssm_chunk_checks(s):
    """lmspec's SSD chunk of s positions with a carried state (ops/ssm.rs)."""
    B, H, P, G, N = 1, 8, 16, 2, 16
    rep = H // G
    dtx = mx.random.normal((B, s, H, P))
    dta = -mx.abs(mx.random.normal((B, s, H))) * 0.1
    conv = mx.random.normal((B, s, 2 * G * N + 7))
    prev = mx.random.normal((B, H, P, N))
    mx.eval(dtx, dta, conv, prev)

    def parts(conv):
        bm = conv[..., : G * N].reshape(B, s, G, N)
        cm = conv[..., G * N : 2 * G * N].reshape(B, s, G, N)
        return bm, cm

    def repeat_groups(x):
        sh = list(x.shape)
        wide = sh[:2] + [rep] + sh[2:]
        out = list(sh)
        out[1] *= rep
        return mx.broadcast_to(mx.expand_dims(x, 2), wide).reshape(out)

    def chunk(dtx, dta, conv, prev, contiguous=False):
        bm, cm = parts(conv)
        if contiguous:
            bm, cm = mx.contiguous(bm), mx.contiguous(cm)
        bt = bm.transpose(0, 2, 3, 1)
        cb = repeat_groups(cm.swapaxes(1, 2) @ bt)
        z = mx.broadcast_to(mx.expand_dims(dta.swapaxes(1, 2), -1), (B, H, s, s))
        seg = mx.cumsum(mx.tril(z, -1), axis=-2)
        decay = mx.exp(seg)
        m = mx.tril(cb * decay, 0)
        y = (m @ dtx.swapaxes(1, 2)).swapaxes(1, 2)
        last = decay[:, :, s - 1 : s].transpose(0, 3, 1, 2)
        bh = repeat_groups(bt).swapaxes(2, 3)
        weighted = (dtx * last).swapaxes(1, 2).swapaxes(2, 3)
        new = weighted @ bh
        ecs = mx.exp(mx.cumsum(dta, axis=-2))
        end = ecs[:, s - 1 : s].reshape(B, H, 1, 1)
        new = new + end * prev
        sp = prev.reshape(B, 1, G, rep, P, N)
        c6 = cm.reshape(B, s, G, 1, N, 1)
        y_prev = (sp @ c6).reshape(B, s, H, P)
        y = y + mx.expand_dims(ecs, -1) * y_prev
        return [y, new, cb, decay, m, weighted @ bh, y_prev]

    check(f"ssm chunk of {s} with state: y, state and parts", chunk, dtx, dta, conv, prev)
    check(f"ssm chunk of {s} with state, B/C contiguous", lambda *a: chunk(*a, contiguous=True), dtx, dta, conv, prev)
    check(f"cumsum axis -2 [B,{s},H]", lambda a: mx.cumsum(a, axis=-2), dta)
    z = mx.broadcast_to(mx.expand_dims(dta.swapaxes(1, 2), -1), (B, H, s, s))
    check("tril(broadcast) then cumsum axis -2", lambda a: mx.cumsum(mx.tril(a, -1), axis=-2), z)
    check("cumsum axis -2 of a transposed view", lambda a: mx.cumsum(a.swapaxes(1, 2), axis=-1), dta)
    sp = prev.reshape(B, 1, G, rep, P, N)
    c6 = mx.random.normal((B, s, G, 1, N, 1))
    check(f"6-D matmul with broadcast batch axes (s={s})", lambda a, b: a @ b, sp, c6)


def conv_checks():
    # lmspec's short_conv with its cache (ops/conv.rs, cache.rs): the kept
    # rows are a slice of the last concatenation; a tap loop over slices.
    K, D, T0 = 4, 24, 8
    xs = mx.random.normal((1, T0 + 4, 3 * D))
    taps = mx.random.normal((K, D))
    mx.eval(xs, taps)

    def conv_steps(xs, taps, per_step_eval=False):
        rows, outs = None, []
        for t0, t1 in [(0, T0)] + [(t, t + 1) for t in range(T0, T0 + 4)]:
            x = xs[:, t0:t1, D : 2 * D]  # a slice of a fused projection
            prev = rows if rows is not None else mx.zeros((1, K - 1, D))
            allr = mx.concatenate([prev, x], axis=1)
            n = allr.shape[1]
            rows = allr[:, n - (K - 1) : n]
            t = t1 - t0
            out = None
            for j in range(K):
                term = allr[:, j : j + t] * taps[j]
                out = term if out is None else out + term
            outs.append(out)
            if per_step_eval:
                mx.eval(out, rows)
        return mx.concatenate(outs, axis=1)

    check("short_conv with its cache, prefill then 4 steps", conv_steps, xs, taps)
    check("short_conv with its cache, evaluated per step", lambda *a: conv_steps(*a, per_step_eval=True), xs, taps)


if __name__ == "__main__":
    mx.random.seed(0)
    which = sys.argv[1:] or ["rope", "quantized", "ssm"]
    if "rope" in which:
        rope_checks()
    if "quantized" in which:
        quantized_checks()
    if "ssm" in which:
        ssm_checks()
    bad = [n for n, r in RESULTS if r > 1e-2]
    print(f"{len(RESULTS)} checks, {len(bad)} off by more than 1e-2")
