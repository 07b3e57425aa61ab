//! The recurrences against f64 references, each fed
//! whole and in pieces through its cache slot: `selective_scan`
//! (Mamba-1), `gated_delta`'s Kimi Delta Attention options, `lightning`,
//! `rg_lru` (Griffin).
use lmspec_spec::expr::Value;
use lmspec_spec::ops::{Layout as ValueInfo, StateKind};
use mlx_rs::Array;

use super::tests::{build, close, noise, rows, run, run_in_pieces};
use super::{Ctx, Param};
use crate::cache::{CacheKind, CreateState};

/// The op's declared state: a recurrent slot, which `ModelCache::trim`
/// refuses to rewind.
fn assert_recurrent(kind: &str, given: &[(&str, Value)], inputs: &[ValueInfo]) {
    let op = super::tests::parse(kind, given);
    let resolved = op.resolve("", inputs).expect("resolve");
    assert_eq!(resolved.state, Some(StateKind::Recurrent));
}

fn softplus(v: f64) -> f64 {
    v.exp().ln_1p()
}

/// Mamba-1's recurrence in f64: per channel c and state n,
/// `S = exp(dt A) S + dt x B`, `y = S · C + D x`, `dt = softplus(dt_raw)`.
fn selective_scan_reference(
    [x, dt, bm, cm]: [&[f32]; 4],
    a_log: &[f32],
    d: &[f32],
    (t, c, n): (usize, usize, usize),
) -> Vec<f64> {
    let mut s = vec![0.0f64; c * n];
    let mut out = Vec::new();
    for p in 0..t {
        for ch in 0..c {
            let step = softplus(f64::from(dt[p * c + ch]));
            let xv = f64::from(x[p * c + ch]);
            let mut y = 0.0;
            for k in 0..n {
                let a = -f64::from(a_log[ch * n + k]).exp();
                let st = &mut s[ch * n + k];
                *st = (step * a).exp() * *st + step * xv * f64::from(bm[p * n + k]);
                y += *st * f64::from(cm[p * n + k]);
            }
            out.push(y + f64::from(d[ch]) * xv);
        }
    }
    out
}

#[test]
fn selective_scan_matches_the_recurrence_whole_and_in_pieces() {
    let (t, c, n) = (9usize, 6usize, 4usize);
    let x = noise(t * c, 51);
    let dt = noise(t * c, 52);
    let bm = noise(t * n, 53);
    let cm = noise(t * n, 54);
    // A_log per (channel, state), as mlx-lm's log(1..=N) rows but varied.
    let a_log: Vec<f32> = noise(c * n, 55).iter().map(|v| v * 1.5).collect();
    let d = noise(c, 56);
    let want = selective_scan_reference([&x, &dt, &bm, &cm], &a_log, &d, (t, c, n));
    let given = [
        ("weight", Value::Str("mixer".into())),
        ("channels", Value::Int(c as i64)),
        ("state", Value::Int(n as i64)),
    ];
    let infos = [c, c, n, n].map(|w| ValueInfo::flat(w as i64));
    assert_recurrent("selective_scan", &given, &infos);
    let weights = vec![
        Param::Dense(Array::from_slice(&a_log, &[c as i32, n as i32])),
        Param::Dense(Array::from_slice(&d, &[c as i32])),
    ];
    let op = build("selective_scan", &given, &infos, weights);
    let args = |a: usize, b: usize| {
        vec![
            rows(&x, c, a, b),
            rows(&dt, c, a, b),
            rows(&bm, n, a, b),
            rows(&cm, n, a, b),
        ]
    };
    let whole = args(0, t);
    let refs: Vec<&Array> = whole.iter().collect();
    close(&run(op.as_ref(), &refs, 0), &want, 1e-5);
    let pieces = [(0, 5), (5, 6), (6, 8), (8, 9)];
    close(
        &run_in_pieces(op.as_ref(), CacheKind::Recurrent, &pieces, args),
        &want,
        1e-5,
    );
}

/// The gated delta rule with Kimi Delta Attention's options, in f64: the
/// decay per key channel (`a`, `dt_bias` `[Hv * Dk]`, A per head), or
/// with a lower bound `exp(lb sigmoid(exp(A_log) (a + dt_bias)))`; beta
/// doubled with `neg_eigval`. q, k unit length (q times dk^-0.5).
#[allow(clippy::too_many_arguments)]
fn kda_reference(
    [q, k, v, a, b]: [&[f32]; 5],
    [a_log, dt_bias]: [&[f32]; 2],
    (t, hk, hv, dk, dv): (usize, usize, usize, usize, usize),
    (channel, lower_bound, neg_eigval): (bool, Option<f64>, bool),
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
    let gates = if channel { dk } else { 1 };
    for p in 0..t {
        for j in 0..hv {
            let h = j / rep;
            let qh = unit(
                &q[(p * hk + h) * dk..(p * hk + h + 1) * dk],
                (dk as f64).powf(-0.5),
            );
            let kh = unit(&k[(p * hk + h) * dk..(p * hk + h + 1) * dk], 1.0);
            let mut beta = 1.0 / (1.0 + (-f64::from(b[p * hv + j])).exp());
            if neg_eigval {
                beta *= 2.0;
            }
            let rate = f64::from(a_log[j]).exp();
            let g: Vec<f64> = (0..gates)
                .map(|c| {
                    let x =
                        f64::from(a[(p * hv + j) * gates + c]) + f64::from(dt_bias[j * gates + c]);
                    match lower_bound {
                        None => (-rate * softplus(x)).exp(),
                        Some(lb) => (lb / (1.0 + (-rate * x).exp())).exp(),
                    }
                })
                .collect();
            for r in 0..dv {
                let row = &mut s[(j * dv + r) * dk..(j * dv + r + 1) * dk];
                row.iter_mut()
                    .enumerate()
                    .for_each(|(c, x)| *x *= g[if channel { c } else { 0 }]);
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
fn kda_gates_match_the_recurrence_whole_and_in_pieces() {
    let (t, hk, hv, dk, dv) = (7usize, 2usize, 4usize, 3usize, 2usize);
    for (channel, lower_bound, neg_eigval) in [
        (true, None, false),
        (true, Some(-5.0), false),
        (false, None, true),
        (false, Some(-2.0), true),
    ] {
        let gates = if channel { hv * dk } else { hv };
        let q = noise(t * hk * dk, 61);
        let k = noise(t * hk * dk, 62);
        let v = noise(t * hv * dv, 63);
        let a = noise(t * gates, 64);
        let b = noise(t * hv, 65);
        let a_log = noise(hv, 66);
        let dt_bias = noise(gates, 67);
        let want = kda_reference(
            [&q, &k, &v, &a, &b],
            [&a_log, &dt_bias],
            (t, hk, hv, dk, dv),
            (channel, lower_bound, neg_eigval),
        );
        let given = [
            ("weight", Value::Str("attn".into())),
            ("key_heads", Value::Int(hk as i64)),
            ("value_heads", Value::Int(hv as i64)),
            ("key_dim", Value::Int(dk as i64)),
            ("value_dim", Value::Int(dv as i64)),
            ("channel_gate", Value::Bool(channel)),
            ("lower_bound", lower_bound.map_or(Value::Null, Value::Float)),
            ("neg_eigval", Value::Bool(neg_eigval)),
        ];
        let infos = [hk * dk, hk * dk, hv * dv, gates, hv].map(|w| ValueInfo::flat(w as i64));
        assert_recurrent("gated_delta", &given, &infos);
        let weights = vec![
            Param::Dense(Array::from_slice(&a_log, &[hv as i32])),
            Param::Dense(Array::from_slice(&dt_bias, &[gates as i32])),
        ];
        let op = build("gated_delta", &given, &infos, weights);
        let args = |x: usize, y: usize| {
            vec![
                rows(&q, hk * dk, x, y),
                rows(&k, hk * dk, x, y),
                rows(&v, hv * dv, x, y),
                rows(&a, gates, x, y),
                rows(&b, hv, x, y),
            ]
        };
        let whole = args(0, t);
        let refs: Vec<&Array> = whole.iter().collect();
        close(&run(op.as_ref(), &refs, 0), &want, 1e-5);
        let pieces = [(0, 4), (4, 5), (5, 7)];
        close(
            &run_in_pieces(op.as_ref(), CacheKind::Recurrent, &pieces, args),
            &want,
            1e-5,
        );
    }
}

#[test]
fn alibi_slopes_follow_the_power_of_two_rule() {
    use lmspec_spec::ops::alibi_slopes;
    let eight: Vec<f64> = (1..=8).map(|i| 2f64.powi(-i)).collect();
    assert_eq!(alibi_slopes(8), eight);
    // 6 heads: the 4-head slopes, then every other one of the 8-head slopes.
    assert_eq!(
        alibi_slopes(6),
        vec![0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    );
}

/// Lightning attention in f64, per head h: `S = exp(g_h) S + kᵀ v`,
/// `y = scale q S`, `g_h = -slope_h * layer_factor`; q, k, v `[H, T, D]`.
fn lightning_reference(
    [q, k, v]: [&[f32]; 3],
    (h, t, dk, dv): (usize, usize, usize, usize),
    slopes: &[f64],
    (scale, layer_factor): (f64, f64),
) -> Vec<f64> {
    let mut out = vec![0.0f64; h * t * dv];
    for hh in 0..h {
        let decay = (-slopes[hh] * layer_factor).exp();
        let mut s = vec![0.0f64; dk * dv];
        for p in 0..t {
            let row = |x: &[f32], d: usize, c: usize| f64::from(x[(hh * t + p) * d + c]);
            for a in 0..dk {
                for c in 0..dv {
                    s[a * dv + c] = decay * s[a * dv + c] + row(k, dk, a) * row(v, dv, c);
                }
            }
            for c in 0..dv {
                out[(hh * t + p) * dv + c] =
                    (0..dk).map(|a| scale * row(q, dk, a) * s[a * dv + c]).sum();
            }
        }
    }
    out
}

#[test]
fn lightning_matches_the_recurrence_whole_and_in_pieces() {
    let (h, t, dk, dv) = (6usize, 7usize, 4usize, 3usize);
    let q = noise(h * t * dk, 71);
    let k = noise(h * t * dk, 72);
    let v = noise(h * t * dv, 73);
    let (scale, layer_factor) = (0.5, 0.75);
    let slopes = lmspec_spec::ops::alibi_slopes(h);
    let want = lightning_reference([&q, &k, &v], (h, t, dk, dv), &slopes, (scale, layer_factor));
    let given = [
        ("scale", Value::Float(scale)),
        ("layer_factor", Value::Float(layer_factor)),
    ];
    let per_head = |d: usize| ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let infos = [per_head(dk), per_head(dk), per_head(dv)];
    assert_recurrent("lightning", &given, &infos);
    let op = build("lightning", &given, &infos, Vec::new());
    // Positions a..b of a [H, T, D] table as [1, H, b - a, D].
    let heads = |x: &[f32], d: usize, a: usize, b: usize| {
        let mut part = Vec::new();
        for hh in 0..h {
            part.extend_from_slice(&x[(hh * t + a) * d..(hh * t + b) * d]);
        }
        Array::from_slice(&part, &[1, h as i32, (b - a) as i32, d as i32])
    };
    let args = |a: usize, b: usize| {
        vec![
            heads(&q, dk, a, b),
            heads(&k, dk, a, b),
            heads(&v, dv, a, b),
        ]
    };
    let whole = args(0, t);
    let refs: Vec<&Array> = whole.iter().collect();
    close(&run(op.as_ref(), &refs, 0), &want, 1e-5);
    // In pieces: each call returns [1, H, n, Dv]; put them back per head.
    let pieces = [(0, 3), (3, 4), (4, 7)];
    let mut slot = CacheKind::Recurrent.create(Default::default());
    let mut got = vec![0.0f32; h * t * dv];
    for (a, b) in pieces {
        let xs = args(a, b);
        let refs: Vec<&Array> = xs.iter().collect();
        let mut ctx = Ctx {
            offset: a as i32,
            key_mask: None,
            positions: None,
            cache: Some(&mut slot),
        };
        let y = op.forward(&refs, &mut ctx).expect("forward");
        let y = y.contiguous().expect("contiguous");
        y.eval().expect("eval");
        let ys = y.as_slice::<f32>();
        for hh in 0..h {
            for p in a..b {
                for c in 0..dv {
                    got[(hh * t + p) * dv + c] = ys[(hh * (b - a) + p - a) * dv + c];
                }
            }
        }
    }
    close(&got, &want, 1e-5);
}

/// RG-LRU in f64 per channel: `log a = -8 ga softplus(p)`,
/// `h = a h + sqrt(1 - a²) gx x` (multiplier 1 at the sequence's start).
fn rg_lru_reference([x, gx, ga]: [&[f32]; 3], p: &[f32], (t, d): (usize, usize)) -> Vec<f64> {
    let mut h = vec![0.0f64; d];
    let mut out = Vec::new();
    for s in 0..t {
        for c in 0..d {
            let v = |a: &[f32]| f64::from(a[s * d + c]);
            let log_a = -8.0 * v(ga) * softplus(f64::from(p[c]));
            let mult = if s == 0 {
                1.0
            } else {
                (1.0 - (2.0 * log_a).exp()).sqrt()
            };
            h[c] = log_a.exp() * h[c] + mult * v(gx) * v(x);
            out.push(h[c]);
        }
    }
    out
}

#[test]
fn rg_lru_matches_the_recurrence_whole_and_in_pieces() {
    let (t, d) = (9usize, 5usize);
    let x = noise(t * d, 81);
    // Gates are sigmoids: in (0, 1).
    let gate = |seed| {
        noise(t * d, seed)
            .iter()
            .map(|v| (v + 1.0) / 2.0)
            .collect::<Vec<f32>>()
    };
    let (gx, ga) = (gate(82), gate(83));
    let p = noise(d, 84);
    let want = rg_lru_reference([&x, &gx, &ga], &p, (t, d));
    let given = [
        ("weight", Value::Str("rg_lru".into())),
        ("width", Value::Int(d as i64)),
    ];
    let infos = [d, d, d].map(|w| ValueInfo::flat(w as i64));
    assert_recurrent("rg_lru", &given, &infos);
    let op = build(
        "rg_lru",
        &given,
        &infos,
        vec![Param::Dense(Array::from_slice(&p, &[d as i32]))],
    );
    let args = |a: usize, b: usize| vec![rows(&x, d, a, b), rows(&gx, d, a, b), rows(&ga, d, a, b)];
    let whole = args(0, t);
    let refs: Vec<&Array> = whole.iter().collect();
    close(&run(op.as_ref(), &refs, 0), &want, 1e-5);
    // A first piece of one position (the reset), then the rest in pieces.
    let pieces = [(0, 1), (1, 5), (5, 6), (6, 9)];
    close(
        &run_in_pieces(op.as_ref(), CacheKind::Recurrent, &pieces, args),
        &want,
        1e-5,
    );
}
