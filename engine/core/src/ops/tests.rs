//! The newer primitives against reference computations written out here
//! (the formulas of the corresponding mlx / mlx-lm code, in f64).
use lmspec_spec::expr::Value;
use lmspec_spec::ops::{lookup, Layout as ValueInfo};
use mlx_rs::Array;

use super::{Ctx, Op, Param, Weights};
use crate::cache::{CacheKind, CreateState};

/// The config of op `kind` with the `given` parameters (the rest take
/// their schema defaults, as the expander gives them).
pub(super) fn parse(kind: &str, given: &[(&str, Value)]) -> lmspec_spec::ops::OpConfig {
    let entry = lookup(kind).expect("op");
    let values: Vec<Value> = entry
        .schema
        .params
        .iter()
        .map(|def| {
            given
                .iter()
                .find(|(n, _)| *n == def.name)
                .map(|(_, v)| v.clone())
                .or_else(|| def.default.map(|d| d()))
                .unwrap_or(Value::Null)
        })
        .collect();
    (entry.parse)(&values).expect("parse")
}

/// Resolves and builds `kind` with the `given` parameters (the rest take
/// their schema defaults, as the expander gives them).
pub(super) fn build(
    kind: &str,
    given: &[(&str, Value)],
    inputs: &[ValueInfo],
    w: Vec<Param>,
) -> Box<dyn Op> {
    let op = parse(kind, given);
    let resolved = op.resolve("", inputs).expect("resolve");
    let fields = resolved.weights.iter().map(|r| r.field);
    super::build(&op, inputs, Weights::new(fields.zip(w).collect())).expect("build")
}

pub(super) fn run(op: &dyn Op, inputs: &[&Array], offset: i32) -> Vec<f32> {
    let mut ctx = Ctx {
        offset,
        key_mask: None,
        positions: None,
        cache: None,
    };
    let y = op
        .forward(inputs, &mut ctx)
        .and_then(|y| y.contiguous())
        .expect("forward");
    y.eval().expect("eval");
    y.as_slice::<f32>().to_vec()
}

/// Runs `op` over positions `[a, b)` of each bound, one call per bound,
/// through one slot of `kind`; the outputs concatenated.
pub(super) fn run_in_pieces(
    op: &dyn Op,
    kind: CacheKind,
    bounds: &[(usize, usize)],
    args: impl Fn(usize, usize) -> Vec<Array>,
) -> Vec<f32> {
    let mut slot = kind.create(Default::default());
    let mut got = Vec::new();
    for &(a, b) in bounds {
        let xs = args(a, b);
        let refs: Vec<&Array> = xs.iter().collect();
        let mut ctx = Ctx {
            offset: a as i32,
            key_mask: None,
            positions: None,
            cache: Some(&mut slot),
        };
        let y = op.forward(&refs, &mut ctx).expect("forward");
        y.eval().expect("eval");
        got.extend_from_slice(y.as_slice::<f32>());
    }
    got
}

/// `[1, b - a, w]` rows a..b of a `[T, w]` table.
pub(super) fn rows(v: &[f32], w: usize, a: usize, b: usize) -> Array {
    Array::from_slice(&v[a * w..b * w], &[1, (b - a) as i32, w as i32])
}

pub(super) fn close(a: &[f32], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((f64::from(*x) - y).abs() <= tol, "{x} vs {y}");
    }
}

#[test]
fn softcap_is_cap_tanh_x_over_cap() {
    let xs = [-10.0f32, -1.0, 0.0, 2.0, 50.0];
    let x = Array::from_slice(&xs, &[1, 1, 5]);
    let op = build(
        "softcap",
        &[("cap", Value::Float(5.0))],
        &[ValueInfo::flat(5)],
        vec![],
    );
    let want: Vec<f64> = xs
        .iter()
        .map(|&v| 5.0 * (f64::from(v) / 5.0).tanh())
        .collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-6);
}

#[test]
fn slice_takes_a_range_of_the_last_axis() {
    let xs: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let x = Array::from_slice(&xs, &[1, 2, 6]);
    let given = [("start", Value::Int(2)), ("size", Value::Int(3))];
    let op = build("slice", &given, &[ValueInfo::flat(6)], vec![]);
    close(
        &run(op.as_ref(), &[&x], 0),
        &[2.0, 3.0, 4.0, 8.0, 9.0, 10.0],
        0.0,
    );
}

#[test]
fn position_embedding_rows_follow_the_offset() {
    let table: Vec<f32> = (0..8).map(|v| v as f32).collect();
    let w = || vec![Param::Dense(Array::from_slice(&table, &[4, 2]))];
    let tokens = Array::from_slice(&[7i32, 7], &[1, 2]);
    let given = [
        ("positions", Value::Int(4)),
        ("dim", Value::Int(2)),
        ("weight", Value::Str("p".into())),
    ];
    let op = build("position_embedding", &given, &[ValueInfo::flat(1)], w());
    close(&run(op.as_ref(), &[&tokens], 1), &[2.0, 3.0, 4.0, 5.0], 0.0);
    let mut ctx = Ctx {
        offset: 3,
        key_mask: None,
        positions: None,
        cache: None,
    };
    assert!(op.forward(&[&tokens], &mut ctx).is_err(), "past the table");
    let fixed = [
        given[0].clone(),
        given[1].clone(),
        given[2].clone(),
        ("row", Value::Int(0)),
    ];
    let op = build("position_embedding", &fixed, &[ValueInfo::flat(1)], w());
    close(&run(op.as_ref(), &[&tokens], 3), &[0.0, 1.0, 0.0, 1.0], 0.0);
}

#[test]
fn per_head_layer_norm_scales_each_head_by_its_row() {
    // x [B=1, H=2, T=1, D=3]; weight [2, 3]: head h's features normalised
    // (mean 0, variance 1 + eps), times row h (mlx-lm's LayerNorm2D).
    let xs = [1.0f32, 2.0, 6.0, -3.0, 0.0, 3.0];
    let ws = [1.0f32, 2.0, 3.0, 0.5, 0.5, 0.5];
    let x = Array::from_slice(&xs, &[1, 2, 1, 3]);
    let w = vec![Param::Dense(Array::from_slice(&ws, &[2, 3]))];
    let given = [
        ("weight", Value::Str("q_norm".into())),
        ("bias", Value::Bool(false)),
        ("per_head", Value::Bool(true)),
    ];
    let input = ValueInfo {
        dim: 3,
        heads: Some(2),
    };
    let op = build("layer_norm", &given, &[input], w);
    let mut want = Vec::new();
    for h in 0..2 {
        let row: Vec<f64> = xs[h * 3..h * 3 + 3].iter().map(|&v| f64::from(v)).collect();
        let mean = row.iter().sum::<f64>() / 3.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0;
        for (k, v) in row.iter().enumerate() {
            want.push((v - mean) / (var + 1e-5).sqrt() * f64::from(ws[h * 3 + k]));
        }
    }
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-5);
}

/// softmax(cap(scale · q kᵀ)) v over the keys a causal window allows, in f64,
/// for q [Hq, T, D] and k, v [Hk, T, D] (grouped-query heads).
fn reference_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: (usize, usize, usize, usize),
    scale: f64,
    window: Option<usize>,
    cap: Option<f64>,
) -> Vec<f64> {
    let allowed = |i: usize, j: usize| window.is_none_or(|w| i - j < w);
    reference_attention_by(q, k, v, dims, scale, cap, |_, i, j| allowed(i, j))
}

/// [`reference_attention`] over the keys `j <= i` that `allowed(h, i, j)` lets
/// query `i` see.
fn reference_attention_by(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (hq, hk, t, d): (usize, usize, usize, usize),
    scale: f64,
    cap: Option<f64>,
    allowed: impl Fn(usize, usize, usize) -> bool,
) -> Vec<f64> {
    let mut out = vec![0.0; hq * t * d];
    for h in 0..hq {
        let g = h / (hq / hk);
        for i in 0..t {
            let keys: Vec<usize> = (0..=i).filter(|&j| allowed(h, i, j)).collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let s: f64 = (0..d)
                        .map(|x| {
                            f64::from(q[(h * t + i) * d + x]) * f64::from(k[(g * t + j) * d + x])
                        })
                        .sum::<f64>()
                        * scale;
                    cap.map_or(s, |c| c * (s / c).tanh())
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (p, &j) in e.iter().zip(&keys) {
                for x in 0..d {
                    out[(h * t + i) * d + x] += p / z * f64::from(v[(g * t + j) * d + x]);
                }
            }
        }
    }
    out
}

#[test]
fn attention_window_and_softcap_match_the_reference() {
    let (hq, hk, t, d) = (4usize, 2usize, 7usize, 8usize);
    let gen = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 250.0
                    - 2.0
            })
            .collect()
    };
    let (qs, ks, vs) = (gen(hq * t * d, 1), gen(hk * t * d, 2), gen(hk * t * d, 3));
    let q = Array::from_slice(&qs, &[1, hq as i32, t as i32, d as i32]);
    let k = Array::from_slice(&ks, &[1, hk as i32, t as i32, d as i32]);
    let v = Array::from_slice(&vs, &[1, hk as i32, t as i32, d as i32]);
    let heads = |h: usize| ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let infos = [heads(hq), heads(hk), heads(hk)];
    let scale = 0.35;
    for (window, cap) in [
        (None, None),
        (Some(3), None),
        (None, Some(1.5)),
        (Some(2), Some(1.5)),
    ] {
        let given = [
            ("scale", Value::Float(scale)),
            ("causal", Value::Bool(true)),
            (
                "window",
                window.map_or(Value::Null, |w| Value::Int(w as i64)),
            ),
            ("softcap", cap.map_or(Value::Null, Value::Float)),
        ];
        let op = build("attention", &given, &infos, vec![]);
        let want = reference_attention(&qs, &ks, &vs, (hq, hk, t, d), scale, window, cap);
        close(&run(op.as_ref(), &[&q, &k, &v], 0), &want, 2e-5);
    }
}

#[test]
fn block_sparse_attention_gives_each_head_its_blocks_whole_and_through_the_cache() {
    // 4 query heads over 2 key/value heads, blocks of 3 positions, the
    // query's own block and every second block beyond it, offset by the
    // head (mlx-lm's phi3small mask).
    let (hq, hk, t, d) = (4usize, 2usize, 14usize, 8usize);
    let (block, local, stride) = (3usize, 1usize, 2usize);
    let (qs, ks, vs) = (
        noise(hq * t * d, 51),
        noise(hk * t * d, 52),
        noise(hk * t * d, 53),
    );
    let part = |x: &[f32], h: usize, a: usize, b: usize| positions(x, (h, t, d), a, b);
    let heads = |h: usize| ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let infos = [heads(hq), heads(hk), heads(hk)];
    let scale = 0.5;
    let given = [
        ("scale", Value::Float(scale)),
        ("sparse_block", Value::Int(block as i64)),
        ("sparse_local", Value::Int(local as i64)),
        ("sparse_stride", Value::Int(stride as i64)),
    ];
    let op = build("attention", &given, &infos, vec![]);
    let dims = (hq, hk, t, d);
    let want = reference_attention_by(&qs, &ks, &vs, dims, scale, None, |h, i, j| {
        let (qb, kb) = (i / block, j / block);
        qb - kb < local || (kb + h + 1) % stride == 0
    });
    // Some head misses a key that plain causal attention would see.
    let plain = reference_attention(&qs, &ks, &vs, dims, scale, None, None);
    assert!(want.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-3));
    let whole = [
        part(&qs, hq, 0, t),
        part(&ks, hk, 0, t),
        part(&vs, hk, 0, t),
    ];
    close(
        &run(op.as_ref(), &[&whole[0], &whole[1], &whole[2]], 0),
        &want,
        2e-5,
    );
    let mut slot = crate::cache::CacheKind::Kv.create(Default::default());
    let got = through_cache(
        op.as_ref(),
        (&qs, &ks, &vs),
        (hq, hk, t, d),
        &[
            (0, 5),
            (5, 9),
            (9, 10),
            (10, 11),
            (11, 12),
            (12, 13),
            (13, 14),
        ],
        &mut slot,
    );
    close(&got, &want, 2e-5);
}

#[test]
fn local_chunk_attention_sees_its_own_chunk_whole_and_through_the_cache() {
    let (hq, hk, t, d) = (2usize, 1usize, 11usize, 8usize);
    let block = 4usize;
    let (qs, ks, vs) = (
        noise(hq * t * d, 41),
        noise(hk * t * d, 42),
        noise(hk * t * d, 43),
    );
    let part = |x: &[f32], h: usize, a: usize, b: usize| positions(x, (h, t, d), a, b);
    let heads = |h: usize| ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let infos = [heads(hq), heads(hk), heads(hk)];
    let scale = 0.5;
    let given = [
        ("scale", Value::Float(scale)),
        ("local_chunk", Value::Int(block as i64)),
    ];
    let op = build("attention", &given, &infos, vec![]);
    let dims = (hq, hk, t, d);
    // mlx-lm's llama4 chunk mask: the same block, and causal.
    let want = reference_attention_by(&qs, &ks, &vs, dims, scale, None, |_, i, j| {
        i / block == j / block
    });
    let whole = [
        part(&qs, hq, 0, t),
        part(&ks, hk, 0, t),
        part(&vs, hk, 0, t),
    ];
    close(
        &run(op.as_ref(), &[&whole[0], &whole[1], &whole[2]], 0),
        &want,
        2e-5,
    );
    // Through the standard cache, in calls that cross block boundaries
    // (a prompt in two chunks, then single steps).
    let mut slot = crate::cache::CacheKind::Kv.create(Default::default());
    let got = through_cache(
        op.as_ref(),
        (&qs, &ks, &vs),
        (hq, hk, t, d),
        &[(0, 3), (3, 6), (6, 7), (7, 8), (8, 9), (9, 10), (10, 11)],
        &mut slot,
    );
    close(&got, &want, 2e-5);
    // A rotating cache drops positions a block may need: refused.
    let mut rotating = crate::cache::CacheKind::Kv.create(crate::cache::CacheOptions {
        max_kv_size: Some(8),
    });
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: Some(&mut rotating),
    };
    let err = op
        .forward(&[&whole[0], &whole[1], &whole[2]], &mut ctx)
        .expect_err("a rotating cache");
    assert!(err.to_string().contains("max_kv_size"), "{err}");
}

/// Positions a..b of every head of a `[h, t, d]` buffer, as `[1, h, b - a, d]`.
fn positions(x: &[f32], (h, t, d): (usize, usize, usize), a: usize, b: usize) -> Array {
    let rows: Vec<f32> = (0..h)
        .flat_map(|hh| x[(hh * t + a) * d..(hh * t + b) * d].iter().copied())
        .collect();
    Array::from_slice(&rows, &[1, h as i32, (b - a) as i32, d as i32])
}

/// An attention op over q, k, v (`[H, T, D]` buffers) run through `slot`
/// in calls of positions `a..b`, the outputs as one `[Hq, T, D]` buffer.
fn through_cache(
    op: &dyn Op,
    (qs, ks, vs): (&[f32], &[f32], &[f32]),
    (hq, hk, t, d): (usize, usize, usize, usize),
    calls: &[(usize, usize)],
    slot: &mut crate::cache::CacheState,
) -> Vec<f32> {
    let mut got = vec![0.0f32; hq * t * d];
    for &(a, b) in calls {
        let mut ctx = Ctx {
            offset: a as i32,
            key_mask: None,
            positions: None,
            cache: Some(&mut *slot),
        };
        let xs = [
            positions(qs, (hq, t, d), a, b),
            positions(ks, (hk, t, d), a, b),
            positions(vs, (hk, t, d), a, b),
        ];
        let y = op
            .forward(&[&xs[0], &xs[1], &xs[2]], &mut ctx)
            .and_then(|y| y.contiguous())
            .expect("forward");
        y.eval().expect("eval");
        let y = y.as_slice::<f32>();
        for h in 0..hq {
            let rows = (b - a) * d;
            got[(h * t + a) * d..(h * t + b) * d].copy_from_slice(&y[h * rows..(h + 1) * rows]);
        }
    }
    got
}

#[test]
fn attention_chunk_window_widens_multi_token_calls_only() {
    let (hq, hk, t, d) = (2usize, 1usize, 11usize, 8usize);
    let (window, chunk) = (3usize, 4usize);
    let (qs, ks, vs) = (
        noise(hq * t * d, 31),
        noise(hk * t * d, 32),
        noise(hk * t * d, 33),
    );
    let part = |x: &[f32], h: usize, a: usize, b: usize| positions(x, (h, t, d), a, b);
    let heads = |h: usize| ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let infos = [heads(hq), heads(hk), heads(hk)];
    let scale = 0.5;
    let given = [
        ("scale", Value::Float(scale)),
        ("window", Value::Int(window as i64)),
        ("chunk_window", Value::Int(chunk as i64)),
    ];
    let op = build("attention", &given, &infos, vec![]);
    let dims = (hq, hk, t, d);
    // A whole forward is one multi-token call: every query sees `chunk`.
    let whole = [
        part(&qs, hq, 0, t),
        part(&ks, hk, 0, t),
        part(&vs, hk, 0, t),
    ];
    let want = reference_attention(&qs, &ks, &vs, dims, scale, Some(chunk), None);
    close(
        &run(op.as_ref(), &[&whole[0], &whole[1], &whole[2]], 0),
        &want,
        2e-5,
    );
    // Through the rotating cache of `window` positions: two chunks, then
    // single steps. A chunk's queries see `chunk` positions, but only the
    // `window - 1` cached ones before the chunk (so its first query sees
    // `window`); a single step sees the `window` the cache keeps.
    let calls = [(0, 4), (4, 8), (8, 9), (9, 10), (10, 11)];
    let call_of = |i: usize| calls.iter().copied().find(|&(a, b)| a <= i && i < b);
    let want = reference_attention_by(&qs, &ks, &vs, dims, scale, None, |_, i, j| {
        let (a, b) = call_of(i).expect("a call");
        let w = if b - a > 1 { chunk } else { window };
        i - j < w && j + window > a
    });
    let mut slot = crate::cache::CacheKind::Window(window as i32).create(Default::default());
    let got = through_cache(op.as_ref(), (&qs, &ks, &vs), dims, &calls, &mut slot);
    close(&got, &want, 2e-5);
    // A chunk window needs a window, and cannot be narrower than it.
    for (w, c, msg) in [
        (Value::Null, 4, "needs a window"),
        (Value::Int(3), 2, "2 is below window 3"),
    ] {
        let entry = lookup("attention").expect("op");
        let values: Vec<Value> = entry
            .schema
            .params
            .iter()
            .map(|def| match def.name {
                "scale" => Value::Float(scale),
                "window" => w.clone(),
                "chunk_window" => Value::Int(c),
                _ => def.default.map_or(Value::Null, |d| d()),
            })
            .collect();
        let op = (entry.parse)(&values).expect("parse");
        let err = op.resolve("", &infos).expect_err("refused");
        assert_eq!(err.field, "chunk_window");
        assert!(err.msg.contains(msg), "{}", err.msg);
    }
}

/// Deterministic pseudo-random values in [-1, 1).
pub(super) fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// mlx-lm's sparse MoE block with a SwitchGLU, in f64: route each token,
/// run its top-k experts (`down(silu(gate x) * up x)`), sum by score.
#[allow(clippy::too_many_arguments)]
fn moe_reference(
    x: &[f32],
    tokens: usize,
    d: usize,
    e: usize,
    f: usize,
    k: usize,
    w: [&[f32]; 4],
    topk_softmax: bool,
    norm: bool,
) -> Vec<f64> {
    let [router, gate, up, down] = w;
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum::<f64>()
    };
    let softmax = |v: &[f64]| {
        let m = v.iter().cloned().fold(f64::MIN, f64::max);
        let ex: Vec<f64> = v.iter().map(|t| (t - m).exp()).collect();
        let s: f64 = ex.iter().sum();
        ex.into_iter().map(|t| t / s).collect::<Vec<_>>()
    };
    let mut out = Vec::new();
    for t in 0..tokens {
        let xt = &x[t * d..(t + 1) * d];
        let logits: Vec<f64> = (0..e)
            .map(|j| dot(&router[j * d..(j + 1) * d], xt))
            .collect();
        let ranked_by = if topk_softmax {
            logits.clone()
        } else {
            softmax(&logits)
        };
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|a, b| ranked_by[*b].total_cmp(&ranked_by[*a]));
        let chosen = &order[..k];
        let mut scores: Vec<f64> = if topk_softmax {
            softmax(&chosen.iter().map(|&j| logits[j]).collect::<Vec<_>>())
        } else {
            chosen.iter().map(|&j| ranked_by[j]).collect()
        };
        if norm {
            let s: f64 = scores.iter().sum();
            scores.iter_mut().for_each(|v| *v /= s);
        }
        let mut y = vec![0.0f64; d];
        for (&j, sc) in chosen.iter().zip(&scores) {
            let h: Vec<f64> = (0..f)
                .map(|r| {
                    let g = dot(&gate[(j * f + r) * d..(j * f + r + 1) * d], xt);
                    let u = dot(&up[(j * f + r) * d..(j * f + r + 1) * d], xt);
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            for (o, yo) in y.iter_mut().enumerate() {
                let row = &down[(j * d + o) * f..(j * d + o + 1) * f];
                *yo += sc
                    * row
                        .iter()
                        .zip(&h)
                        .map(|(p, q)| f64::from(*p) * q)
                        .sum::<f64>();
            }
        }
        out.extend(y);
    }
    out
}

#[test]
fn moe_routes_tokens_through_their_top_k_experts() {
    let (d, e, f, k) = (8usize, 4usize, 6usize, 2usize);
    let router = noise(e * d, 1);
    let gate = noise(e * f * d, 2);
    let up = noise(e * f * d, 3);
    let down = noise(e * d * f, 4);
    // 5 tokens: below the sort threshold; 40 tokens (80 routed slots): sorted.
    for tokens in [5usize, 40] {
        let x = noise(tokens * d, 5 + tokens as u64);
        let xa = Array::from_slice(&x, &[1, tokens as i32, d as i32]);
        for (routing, norm) in [
            ("softmax_topk", false),
            ("softmax_topk", true),
            ("topk_softmax", false),
        ] {
            let weights = vec![
                Param::Dense(Array::from_slice(&router, &[e as i32, d as i32])),
                Param::Dense(Array::from_slice(&gate, &[e as i32, f as i32, d as i32])),
                Param::Dense(Array::from_slice(&up, &[e as i32, f as i32, d as i32])),
                Param::Dense(Array::from_slice(&down, &[e as i32, d as i32, f as i32])),
            ];
            let given = [
                ("router", Value::Str("gate".into())),
                ("experts", Value::Str("switch_mlp".into())),
                ("num_experts", Value::Int(e as i64)),
                ("top_k", Value::Int(k as i64)),
                ("hidden", Value::Int(f as i64)),
                ("routing", Value::Str(routing.into())),
                ("norm_topk", Value::Bool(norm)),
            ];
            let op = build("moe", &given, &[ValueInfo::flat(d as i64)], weights);
            let want = moe_reference(
                &x,
                tokens,
                d,
                e,
                f,
                k,
                [&router, &gate, &up, &down],
                routing == "topk_softmax",
                norm,
            );
            close(&run(op.as_ref(), &[&xa], 0), &want, 1e-5);
        }
    }
}

#[test]
fn short_conv_is_causal_depthwise_and_streams_through_its_state() {
    let (t, d, k) = (6usize, 3usize, 3usize);
    let x = noise(t * d, 11);
    let w = noise(d * k, 12);
    let bias = noise(d, 13);
    let weights = || {
        vec![
            Param::Dense(Array::from_slice(&w, &[d as i32, k as i32, 1])),
            Param::Dense(Array::from_slice(&bias, &[d as i32])),
        ]
    };
    let given = [
        ("weight", Value::Str("conv".into())),
        ("kernel", Value::Int(k as i64)),
        ("bias", Value::Bool(true)),
    ];
    // mlx conv1d (cross-correlation) over the input left-padded with k - 1
    // zeros: out[s, c] = b[c] + sum_j w[c, j] * x[s + j - (k - 1), c].
    let mut want = Vec::new();
    for s in 0..t {
        for c in 0..d {
            let mut acc = f64::from(bias[c]);
            for j in 0..k {
                let src = s as i64 + j as i64 - (k as i64 - 1);
                if src >= 0 {
                    acc += f64::from(w[c * k + j]) * f64::from(x[src as usize * d + c]);
                }
            }
            want.push(acc);
        }
    }
    let op = build(
        "short_conv",
        &given,
        &[ValueInfo::flat(d as i64)],
        weights(),
    );
    let xa = Array::from_slice(&x, &[1, t as i32, d as i32]);
    close(&run(op.as_ref(), &[&xa], 0), &want, 1e-6);
    // The same positions two, then one at a time, through the cache slot.
    let mut state = crate::cache::CacheKind::Conv(k as i32 - 1).create(Default::default());
    let mut got = Vec::new();
    for (a, b) in [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6)] {
        let part = Array::from_slice(&x[a * d..b * d], &[1, (b - a) as i32, d as i32]);
        let mut ctx = Ctx {
            offset: a as i32,
            key_mask: None,
            positions: None,
            cache: Some(&mut state),
        };
        let y = op.forward(&[&part], &mut ctx).expect("forward");
        y.eval().expect("eval");
        got.extend_from_slice(y.as_slice::<f32>());
    }
    close(&got, &want, 1e-6);
}

/// The state-space (SSD) recurrence, one position at a time in f64 (head h
/// reads group h / (heads / groups)): `S = exp(dt A) S + (dt x) ⊗ B`, `y = S · C + D x`.
#[allow(clippy::too_many_arguments)]
fn ssm_reference(
    x: &[f32],
    bm: &[f32],
    cm: &[f32],
    dt_raw: &[f32],
    [a_log, d, dt_bias]: [&[f32]; 3],
    (t, h, p, g, n): (usize, usize, usize, usize, usize),
    (lo, hi): (f64, f64),
) -> Vec<f64> {
    let rep = h / g;
    let mut state = vec![0.0f64; h * p * n];
    let mut out = Vec::new();
    for s in 0..t {
        for hh in 0..h {
            let gg = hh / rep;
            let v = f64::from(dt_raw[s * h + hh]) + f64::from(dt_bias[hh]);
            let dt = (v.exp().ln_1p()).clamp(lo, hi);
            let a = -f64::from(a_log[hh]).exp();
            let decay = (dt * a).exp();
            for pp in 0..p {
                let xv = f64::from(x[(s * h + hh) * p + pp]);
                let mut y = 0.0;
                for nn in 0..n {
                    let st = &mut state[(hh * p + pp) * n + nn];
                    *st = decay * *st + dt * xv * f64::from(bm[(s * g + gg) * n + nn]);
                    y += *st * f64::from(cm[(s * g + gg) * n + nn]);
                }
                out.push(y + f64::from(d[hh]) * xv);
            }
        }
    }
    out
}

#[test]
fn ssm_matches_the_recurrence_across_chunks_and_decode_steps() {
    let (t, h, p, g, n) = (260usize, 4usize, 2usize, 2usize, 3usize);
    let x = noise(t * h * p, 21);
    let bm = noise(t * g * n, 22);
    let cm = noise(t * g * n, 23);
    let dt_raw = noise(t * h, 24);
    let a_log: Vec<f32> = noise(h, 25).iter().map(|v| v.abs()).collect();
    let d = noise(h, 26);
    let dt_bias = noise(h, 27);
    let (lo, hi) = (0.05f64, 0.8f64);
    let want = ssm_reference(
        &x,
        &bm,
        &cm,
        &dt_raw,
        [&a_log, &d, &dt_bias],
        (t, h, p, g, n),
        (lo, hi),
    );
    let weights = || {
        [&a_log, &d, &dt_bias]
            .iter()
            .map(|w| Param::Dense(Array::from_slice(w, &[h as i32])))
            .collect::<Vec<_>>()
    };
    let given = [
        ("weight", Value::Str("mixer".into())),
        ("heads", Value::Int(h as i64)),
        ("head_dim", Value::Int(p as i64)),
        ("groups", Value::Int(g as i64)),
        ("state", Value::Int(n as i64)),
        ("dt_min", Value::Float(lo)),
        ("dt_max", Value::Float(hi)),
    ];
    let infos = [
        ValueInfo::flat((h * p) as i64),
        ValueInfo::flat((g * n) as i64),
        ValueInfo::flat((g * n) as i64),
        ValueInfo::flat(h as i64),
    ];
    let op = build("ssm", &given, &infos, weights());
    // Whole sequence without a cache: two chunks (256 + 4 positions).
    let args = |a, b| {
        vec![
            rows(&x, h * p, a, b),
            rows(&bm, g * n, a, b),
            rows(&cm, g * n, a, b),
            rows(&dt_raw, h, a, b),
        ]
    };
    let whole = args(0, t);
    let refs: Vec<&Array> = whole.iter().collect();
    close(&run(op.as_ref(), &refs, 0), &want, 1e-4);
    // Prefill of 257 positions, then one at a time through the state slot.
    let mut bounds = vec![(0, 257)];
    bounds.extend((257..t).map(|s| (s, s + 1)));
    let got = run_in_pieces(op.as_ref(), CacheKind::Recurrent, &bounds, args);
    close(&got, &want, 1e-4);
}

/// The gated delta rule in f64, one position at a time: value head j uses
/// key head j / (hv / hk); q and k unit length (q times dk^-0.5).
#[allow(clippy::too_many_arguments)]
fn gated_delta_reference(
    [q, k, v, a, b]: [&[f32]; 5],
    [a_log, dt_bias]: [&[f32]; 2],
    (t, hk, hv, dk, dv): (usize, usize, usize, usize, usize),
) -> Vec<f64> {
    let rep = hv / hk;
    let mut s = vec![0.0f64; hv * dv * dk];
    let mut out = Vec::new();
    let unit = |x: &[f32], scale: f64| {
        let n = (x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() + 1e-6).sqrt();
        x.iter()
            .map(|v| f64::from(*v) / n * scale)
            .collect::<Vec<_>>()
    };
    for p in 0..t {
        for j in 0..hv {
            let h = j / rep;
            let qh = unit(
                &q[(p * hk + h) * dk..(p * hk + h + 1) * dk],
                (dk as f64).powf(-0.5),
            );
            let kh = unit(&k[(p * hk + h) * dk..(p * hk + h + 1) * dk], 1.0);
            let beta = 1.0 / (1.0 + (-f64::from(b[p * hv + j])).exp());
            let sp = (f64::from(a[p * hv + j]) + f64::from(dt_bias[j]))
                .exp()
                .ln_1p();
            let g = (-f64::from(a_log[j]).exp() * sp).exp();
            for r in 0..dv {
                let row = &mut s[(j * dv + r) * dk..(j * dv + r + 1) * dk];
                row.iter_mut().for_each(|x| *x *= g);
                let mem: f64 = row.iter().zip(&kh).map(|(x, y)| x * y).sum();
                let delta = (f64::from(v[(p * hv + j) * dv + r]) - mem) * beta;
                row.iter_mut().zip(&kh).for_each(|(x, y)| *x += y * delta);
                out.push(row.iter().zip(&qh).map(|(x, y)| x * y).sum());
            }
        }
    }
    out
}

#[test]
fn gated_delta_matches_the_recurrence_whole_and_step_by_step() {
    let (t, hk, hv, dk, dv) = (7usize, 2usize, 4usize, 3usize, 2usize);
    let q = noise(t * hk * dk, 31);
    let k = noise(t * hk * dk, 32);
    let v = noise(t * hv * dv, 33);
    let a = noise(t * hv, 34);
    let b = noise(t * hv, 35);
    let a_log = noise(hv, 36);
    let dt_bias = noise(hv, 37);
    let want = gated_delta_reference(
        [&q, &k, &v, &a, &b],
        [&a_log, &dt_bias],
        (t, hk, hv, dk, dv),
    );
    let given = [
        ("weight", Value::Str("linear_attn".into())),
        ("key_heads", Value::Int(hk as i64)),
        ("value_heads", Value::Int(hv as i64)),
        ("key_dim", Value::Int(dk as i64)),
        ("value_dim", Value::Int(dv as i64)),
    ];
    let infos = [hk * dk, hk * dk, hv * dv, hv, hv].map(|w| ValueInfo::flat(w as i64));
    let weights = vec![
        Param::Dense(Array::from_slice(&a_log, &[hv as i32])),
        Param::Dense(Array::from_slice(&dt_bias, &[hv as i32])),
    ];
    let op = build("gated_delta", &given, &infos, weights);
    let args = |x: usize, y: usize| {
        [
            (&q, hk * dk),
            (&k, hk * dk),
            (&v, hv * dv),
            (&a, hv),
            (&b, hv),
        ]
        .map(|(s, w)| rows(s, w, x, y))
        .to_vec()
    };
    let whole = args(0, t);
    let refs: Vec<&Array> = whole.iter().collect();
    close(&run(op.as_ref(), &refs, 0), &want, 1e-5);
    let pieces = [(0, 4), (4, 5), (5, 6), (6, 7)];
    let got = run_in_pieces(op.as_ref(), CacheKind::Recurrent, &pieces, args);
    close(&got, &want, 1e-5);
}

/// Bidirectional attention (encoders) over the keys `|i - j| < window`
/// (ModernBERT's local band: mlx-embeddings' `distance <= local_attention //
/// 2`), or over every key without a window.
#[test]
fn non_causal_attention_sees_every_key_or_a_band() {
    let (h, t, d) = (2usize, 9usize, 4usize);
    let gen = |n: usize, seed: u64| noise(n, seed);
    let (qs, ks, vs) = (gen(h * t * d, 11), gen(h * t * d, 12), gen(h * t * d, 13));
    let shape = [1, h as i32, t as i32, d as i32];
    let (q, k, v) = (
        Array::from_slice(&qs, &shape),
        Array::from_slice(&ks, &shape),
        Array::from_slice(&vs, &shape),
    );
    let info = ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let scale = 0.5;
    for window in [None, Some(3usize), Some(20)] {
        let given = [
            ("scale", Value::Float(scale)),
            ("causal", Value::Bool(false)),
            (
                "window",
                window.map_or(Value::Null, |w| Value::Int(w as i64)),
            ),
        ];
        let op = build("attention", &given, &[info, info, info], vec![]);
        let mut want = vec![0.0f64; h * t * d];
        for hh in 0..h {
            for i in 0..t {
                let keys: Vec<usize> = (0..t)
                    .filter(|&j| window.is_none_or(|w| i.abs_diff(j) < w))
                    .collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|x| {
                                f64::from(qs[(hh * t + i) * d + x])
                                    * f64::from(ks[(hh * t + j) * d + x])
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (p, &j) in e.iter().zip(&keys) {
                    for x in 0..d {
                        want[(hh * t + i) * d + x] += p / z * f64::from(vs[(hh * t + j) * d + x]);
                    }
                }
            }
        }
        close(&run(op.as_ref(), &[&q, &k, &v], 0), &want, 2e-5);
    }
}

/// `offset` shifts the rows a sequence reads (RoBERTa's positions start at
/// padding_idx + 1), and the table then holds `positions - offset` of them.
#[test]
fn position_embedding_offset_skips_the_first_rows() {
    let table: Vec<f32> = (0..10).map(|v| v as f32).collect();
    let w = || vec![Param::Dense(Array::from_slice(&table, &[5, 2]))];
    let tokens = Array::from_slice(&[7i32, 7, 7], &[1, 3]);
    let given = [
        ("positions", Value::Int(5)),
        ("dim", Value::Int(2)),
        ("weight", Value::Str("p".into())),
        ("offset", Value::Int(2)),
    ];
    let op = build("position_embedding", &given, &[ValueInfo::flat(1)], w());
    close(
        &run(op.as_ref(), &[&tokens], 0),
        &[4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        0.0,
    );
    let mut ctx = Ctx {
        offset: 1,
        key_mask: None,
        positions: None,
        cache: None,
    };
    let err = op
        .forward(&[&tokens], &mut ctx)
        .expect_err("past the table");
    assert!(
        err.to_string().contains("past the 3 learned positions"),
        "{err}"
    );
}

#[test]
fn the_dequantized_product_equals_the_quantized_matmul() {
    // The GPU's path for several rows of few features (a workaround of a
    // CUDA kernel fault) must give what quantized_matmul gives on the CPU,
    // at the shapes where the kernel is wrong: 4 rows of 64, group 64.
    for (bits, out) in [(8, 4), (8, 8), (4, 128)] {
        let n = 4 * 64;
        let x = Array::from_iter(
            (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0),
            &[4, 64],
        );
        let w = Array::from_iter(
            (0..out * 64).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0),
            &[out, 64],
        );
        let (wq, s, b) = mlx_rs::ops::quantize(&w, 64, bits).expect("quantize");
        let want = mlx_rs::ops::quantized_matmul(&x, &wq, &s, &b, true, 64, bits).expect("qmm");
        let got = super::linear::dequantized_product(&x, &wq, &s, &b, 64, bits).expect("dense");
        let diff = mlx_rs::ops::abs(mlx_rs::ops::subtract(&want, &got).expect("sub"))
            .and_then(|d| d.max(None))
            .expect("max");
        let diff: f32 = diff.item_cast();
        assert!(diff < 1e-4, "{bits} bits, {out} outputs: {diff}");
    }
}

/// `x` rotated blockwise as Hadamard-rotated checkpoints store it, in f64:
/// forward `H (s * x)`, inverse `s * (H x)`, per block of `b` features,
/// with `H[i][j] = (-1)^popcount(i & j) / sqrt(b)` (the Walsh-Hadamard
/// transform in its natural order, as `mx.hadamard_transform`).
fn rotated(x: &[f64], signs: &[f64], b: usize, inverse: bool) -> Vec<f64> {
    let h = |i: usize, j: usize| {
        let sign = if (i & j).count_ones() % 2 == 0 {
            1.0
        } else {
            -1.0
        };
        sign / (b as f64).sqrt()
    };
    let n = signs.len();
    x.chunks(n)
        .flat_map(|row| {
            let pre: Vec<f64> = (0..n)
                .map(|k| if inverse { row[k] } else { row[k] * signs[k] })
                .collect();
            (0..n)
                .map(|k| {
                    let (blk, i) = (k / b, k % b);
                    let y: f64 = (0..b).map(|j| h(i, j) * pre[blk * b + j]).sum();
                    if inverse {
                        y * signs[k]
                    } else {
                        y
                    }
                })
                .collect::<Vec<f64>>()
        })
        .collect()
}

#[test]
fn rotated_weights_rotate_the_linear_input_and_the_embedding_rows_back() {
    // 8 features in blocks of 4; signs laid out [2, 4] (the rule's work).
    let (n, b, out) = (8usize, 4usize, 3usize);
    let signs: Vec<f32> = (0..n)
        .map(|k| if noise(n, 5)[k] > 0.0 { 1.0 } else { -1.0 })
        .collect();
    let s64: Vec<f64> = signs.iter().map(|&v| f64::from(v)).collect();
    let signs_param = || Param::Dense(Array::from_slice(&signs, &[(n / b) as i32, b as i32]));
    let w = noise(out * n, 6);
    let xs = noise(2 * n, 7);
    let linear = [
        ("weight", Value::Str("p".into())),
        ("out", Value::Int(out as i64)),
    ];
    let dense = || Param::Dense(Array::from_slice(&w, &[out as i32, n as i32]));
    let op = build(
        "linear",
        &linear,
        &[ValueInfo::flat(n as i64)],
        vec![dense(), signs_param()],
    );
    let x = Array::from_slice(&xs, &[1, 2, n as i32]);
    let x64: Vec<f64> = xs.iter().map(|&v| f64::from(v)).collect();
    let r = rotated(&x64, &s64, b, false);
    let w64 = |o: usize, k: usize| f64::from(w[o * n + k]);
    let want: Vec<f64> = r
        .chunks(n)
        .flat_map(|row| (0..out).map(move |o| (0..n).map(|k| w64(o, k) * row[k]).sum()))
        .collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-5);

    // The embedding undoes the rotation on the rows it looks up.
    let table = noise(3 * n, 8);
    let given = [
        ("weight", Value::Str("e".into())),
        ("vocab", Value::Int(3)),
        ("dim", Value::Int(n as i64)),
    ];
    let t = Param::Dense(Array::from_slice(&table, &[3, n as i32]));
    let op = build(
        "embedding",
        &given,
        &[ValueInfo::flat(1)],
        vec![t, signs_param()],
    );
    let ids = Array::from_slice(&[2i32, 0], &[1, 2]);
    let picked: Vec<f64> = [2usize, 0]
        .iter()
        .flat_map(|&r| table[r * n..(r + 1) * n].iter().map(|&v| f64::from(v)))
        .collect();
    close(
        &run(op.as_ref(), &[&ids], 0),
        &rotated(&picked, &s64, b, true),
        1e-6,
    );

    // Signs not laid out by the rule are refused when built.
    let op = parse("linear", &linear);
    let flat_signs = Param::Dense(Array::from_slice(&signs, &[n as i32]));
    let e = super::build(
        &op,
        &[ValueInfo::flat(n as i64)],
        Weights::new(vec![("weight", dense()), ("signs", flat_signs)]),
    )
    .expect_err("refused");
    assert!(e.to_string().contains("laid out [n / block, block]"), "{e}");
}

/// Each query's scores of the keys it sees, in f64: query i (at position
/// `offset + i`) scores key j <= offset + i by Σ_h relu(q_h,i · k_j) ·
/// w_i,h · scale.
fn reference_scores(
    q: &[f32],
    keys: &[f32],
    w: &[f32],
    (h, t, d): (usize, usize, usize),
    offset: usize,
    scale: f64,
) -> Vec<Vec<f64>> {
    (0..t)
        .map(|i| {
            (0..offset + i + 1)
                .map(|j| {
                    (0..h)
                        .map(|hh| {
                            let dot: f64 = (0..d)
                                .map(|x| {
                                    f64::from(q[(hh * t + i) * d + x]) * f64::from(keys[j * d + x])
                                })
                                .sum();
                            dot.max(0.0) * f64::from(w[i * h + hh]) * scale
                        })
                        .sum()
                })
                .collect()
        })
        .collect()
}

/// Checks a keep mask `[1, 1, t, s]` against each query's scores: it keeps
/// `topk` of the keys the query sees (all of them while they are no more),
/// none scoring below one it leaves (ties may go either way).
fn check_keep(keep: &Array, scores: &[Vec<f64>], s: usize, topk: usize, what: &str) {
    let flags = keep.as_slice::<bool>();
    for (i, row) in scores.iter().enumerate() {
        let (mut kept, mut left) = (Vec::new(), Vec::new());
        for (j, &v) in row.iter().enumerate() {
            match flags[i * s + j] {
                true => kept.push(v),
                false => left.push(v),
            }
        }
        assert_eq!(
            kept.len(),
            topk.min(row.len()),
            "{what}: query {i} keeps {kept:?}"
        );
        let low = kept.iter().copied().fold(f64::INFINITY, f64::min);
        let high = left.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(
            low >= high - 1e-6,
            "{what}: query {i} keeps {kept:?}, leaves {left:?}"
        );
    }
}

/// Runs an `index_topk` node of `h` heads of `d` over `pieces` of random
/// queries, keys and weights through one cache slot (quantized to 8 bits,
/// group 32, before the piece starting at `quantize_at`), checking each
/// piece's keep mask against the scores of the keys as the slot holds
/// them.
fn index_pieces(
    (h, d, topk, scale): (usize, usize, usize, f64),
    pieces: &[(usize, usize)],
    quantize_at: Option<usize>,
    seed: u64,
) {
    let total = pieces.last().expect("pieces").1;
    let qs = noise(h * total * d, seed);
    let ks = noise(total * d, seed + 1);
    let ws = noise(total * h, seed + 2);
    let given = [
        ("topk", Value::Int(topk as i64)),
        ("scale", Value::Float(scale)),
    ];
    let heads = |n: usize| ValueInfo {
        dim: d as i64,
        heads: Some(n as i64),
    };
    let op = build(
        "index_topk",
        &given,
        &[heads(h), heads(1), ValueInfo::flat(h as i64)],
        vec![],
    );
    // The keys as an 8-bit cache gives them back.
    let keys = Array::from_slice(&ks, &[total as i32, d as i32]);
    let (w, sc, bi) = mlx_rs::ops::quantize(&keys, 32, 8).expect("quantize");
    let deq = mlx_rs::ops::dequantize(&w, &sc, &bi, 32, 8).expect("dequantize");
    deq.eval().expect("eval");
    let ks_deq = deq.as_slice::<f32>().to_vec();
    let mut slot = CacheKind::Kv.create(Default::default());
    for &(a, b) in pieces {
        let quantized = quantize_at.is_some_and(|q| a >= q);
        if quantize_at == Some(a) {
            let crate::cache::CacheState::Kv(kv) = &slot else {
                panic!("a KV slot")
            };
            slot = crate::cache::CacheState::Quantized(kv.to_quantized(32, 8).expect("quantize"));
        }
        let t = b - a;
        // q [1, H, t, D] from the [H, total, D] table; k [1, 1, t, D]; w [1, t, H].
        let q: Vec<f32> = (0..h)
            .flat_map(|hh| {
                qs[(hh * total + a) * d..(hh * total + b) * d]
                    .iter()
                    .copied()
            })
            .collect();
        let qa = Array::from_slice(&q, &[1, h as i32, t as i32, d as i32]);
        let ka = Array::from_slice(&ks[a * d..b * d], &[1, 1, t as i32, d as i32]);
        let wa = rows(&ws, h, a, b);
        let mut ctx = Ctx {
            offset: a as i32,
            key_mask: None,
            positions: None,
            cache: Some(&mut slot),
        };
        let keep = op.forward(&[&qa, &ka, &wa], &mut ctx).expect("forward");
        keep.eval().expect("eval");
        if b <= topk {
            assert_eq!(keep.ndim(), 0, "every key kept while there are {b}");
            continue;
        }
        assert_eq!(keep.shape(), &[1, 1, t as i32, b as i32]);
        let seen = if quantized { &ks_deq } else { &ks };
        let scores = reference_scores(&q, seen, &ws[a * h..b * h], (h, t, d), a, scale);
        check_keep(&keep, &scores, b, topk, &format!("piece {a}..{b}"));
    }
}

#[test]
fn index_topk_keeps_each_querys_best_scored_keys_through_its_cache() {
    // A prompt of 7 positions, then three single steps.
    index_pieces(
        (3, 32, 4, 0.3),
        &[(0, 7), (7, 8), (8, 9), (9, 10)],
        None,
        11,
    );
}

#[test]
fn index_topk_reads_its_keys_back_from_a_quantized_cache() {
    // After the prompt the slot is quantized to 8 bits (group 32), as
    // `--kv-bits 8` does; the steps score the keys it gives back.
    index_pieces(
        (2, 32, 3, 0.5),
        &[(0, 6), (6, 7), (7, 8), (8, 9)],
        Some(6),
        21,
    );
}

#[test]
fn block_topk_keeps_each_querys_best_blocks_and_its_local_ones() {
    // 2 index heads of 8, each serving 2 query heads; blocks of 3 keys,
    // 2 kept per query (the local one among them); a prompt of 8, then 3
    // single steps (the last block shorter until filled).
    let (h, d, block, topk, local, repeat) = (2usize, 8usize, 3usize, 2usize, 1usize, 2usize);
    let pieces = [(0usize, 8usize), (8, 9), (9, 10), (10, 11)];
    let total = 11;
    let qs = noise(h * total * d, 71);
    let ks = noise(total * d, 72);
    let given = [
        ("block_size", Value::Int(block as i64)),
        ("topk", Value::Int(topk as i64)),
        ("local", Value::Int(local as i64)),
        ("repeat", Value::Int(repeat as i64)),
    ];
    let heads = |n: usize| ValueInfo {
        dim: d as i64,
        heads: Some(n as i64),
    };
    let op = build("block_topk", &given, &[heads(h), heads(1)], vec![]);
    let mut slot = CacheKind::Kv.create(Default::default());
    for (a, b) in pieces {
        let t = b - a;
        let q: Vec<f32> = (0..h)
            .flat_map(|hh| {
                qs[(hh * total + a) * d..(hh * total + b) * d]
                    .iter()
                    .copied()
            })
            .collect();
        let qa = Array::from_slice(&q, &[1, h as i32, t as i32, d as i32]);
        let ka = Array::from_slice(&ks[a * d..b * d], &[1, 1, t as i32, d as i32]);
        let mut ctx = Ctx {
            offset: a as i32,
            key_mask: None,
            positions: None,
            cache: Some(&mut slot),
        };
        let keep = op.forward(&[&qa, &ka], &mut ctx).expect("forward");
        keep.eval().expect("eval");
        let blocks = b.div_ceil(block);
        if topk >= blocks {
            assert_eq!(keep.ndim(), 0, "every block kept while there are {blocks}");
            continue;
        }
        assert_eq!(keep.shape(), &[1, (h * repeat) as i32, t as i32, b as i32]);
        let flags = keep.as_slice::<bool>();
        for hh in 0..h {
            for i in 0..t {
                let p = a + i;
                let score = |j: usize| -> f64 {
                    (0..d)
                        .map(|x| f64::from(q[(hh * t + i) * d + x]) * f64::from(ks[j * d + x]))
                        .sum()
                };
                let own = p / block;
                let is_local = |bl: usize| bl <= own && bl + local > own;
                // The local blocks, then the best others by their best seen key.
                let mut others: Vec<(f64, usize)> = (0..=own)
                    .filter(|&bl| !is_local(bl))
                    .map(|bl| {
                        let best = (bl * block..((bl + 1) * block).min(p + 1))
                            .map(score)
                            .fold(f64::NEG_INFINITY, f64::max);
                        (best, bl)
                    })
                    .collect();
                others.sort_by(|x, y| y.0.total_cmp(&x.0));
                let mut chosen: Vec<usize> = (0..=own).filter(|&bl| is_local(bl)).collect();
                chosen.extend(
                    others
                        .iter()
                        .take(topk.saturating_sub(chosen.len()))
                        .map(|o| o.1),
                );
                let want: Vec<usize> = (0..=p).filter(|j| chosen.contains(&(j / block))).collect();
                for r in 0..repeat {
                    let head = hh * repeat + r;
                    let got: Vec<usize> =
                        (0..b).filter(|&j| flags[(head * t + i) * b + j]).collect();
                    assert_eq!(got, want, "head {head}, position {p}");
                }
            }
        }
    }
}

#[test]
fn the_oai_glu_clips_the_gate_from_above_and_the_up_both_ways() {
    // (clip(up, ±l) + 1) · g · sigmoid(1.702 g), g = min(gate, l).
    let gate = [-2.0f32, 0.5, 3.0, 9.0];
    let up = [-9.0f32, 0.25, -0.5, 8.0];
    let limit = 7.0;
    let op = build(
        "glu",
        &[
            ("fn", Value::Str("silu".into())),
            ("glu", Value::Str("oai".into())),
            ("limit", Value::Float(limit)),
        ],
        &[ValueInfo::flat(4), ValueInfo::flat(4)],
        vec![],
    );
    let g = Array::from_slice(&gate, &[1, 1, 4]);
    let u = Array::from_slice(&up, &[1, 1, 4]);
    let want: Vec<f64> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| {
            let g = f64::from(g).min(limit);
            let u = f64::from(u).clamp(-limit, limit);
            (u + 1.0) * g / (1.0 + (-1.702 * g).exp())
        })
        .collect();
    close(&run(op.as_ref(), &[&g, &u], 0), &want, 1e-5);
}

#[test]
fn block_topk_cuts_a_padded_rows_blocks_from_its_first_key() {
    // A batch row behind 2 slots of padding keeps the keys the same
    // sequence keeps alone (blocks of 2 counted from its first key).
    let d = 4usize;
    let given = [
        ("block_size", Value::Int(2)),
        ("topk", Value::Int(2)),
        ("local", Value::Int(1)),
    ];
    let one = ValueInfo {
        dim: d as i64,
        heads: Some(1),
    };
    let op = build("block_topk", &given, &[one, one], vec![]);
    let ks = noise(7 * d, 5);
    let q = Array::from_slice(&noise(d, 6), &[1, 1, 1, d as i32]);
    let keep = |keys: &Array, offset: i32, mask: Option<&Array>| {
        let mut ctx = Ctx {
            offset,
            key_mask: mask,
            positions: None,
            cache: None,
        };
        let k = op.forward(&[&q, keys], &mut ctx).expect("forward");
        k.eval().expect("eval");
        k.as_slice::<bool>().to_vec()
    };
    let alone = keep(
        &Array::from_slice(&ks[2 * d..], &[1, 1, 5, d as i32]),
        4,
        None,
    );
    let mask = Array::from_slice(&[false, false, true, true, true, true, true], &[1, 7]);
    let padded = keep(
        &Array::from_slice(&ks, &[1, 1, 7, d as i32]),
        6,
        Some(&mask),
    );
    assert_eq!(
        &padded[2..],
        &alone[..],
        "padded {padded:?}, alone {alone:?}"
    );
    assert_eq!(&padded[..2], &[false, false]);
}
