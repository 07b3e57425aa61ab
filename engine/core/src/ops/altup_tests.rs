//! AltUp's ops, `gelu_topk`, `match_rms` and `mean_heads` against mlx-lm's
//! formulas (its gemma3n module) written out in f64.
use lmspec_spec::expr::Value;
use lmspec_spec::ops::Layout;
use mlx_rs::Array;

use super::tests::{build, close, noise, run};
use super::Param;

const N: usize = 3;
const D: usize = 4;
const T: usize = 2;

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// The router's modalities of one row `x` [D]: tanh(router · rms_norm(x) / D).
fn modalities(x: &[f64], norm: &[f64], router: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / D as f64;
    let normed: Vec<f64> = (0..D)
        .map(|d| x[d] / (ms + eps).sqrt() * norm[d] / D as f64)
        .collect();
    (0..N)
        .map(|k| {
            (0..D)
                .map(|d| router[k * D + d] * normed[d])
                .sum::<f64>()
                .tanh()
        })
        .collect()
}

fn clipped(v: &[f32], clip: f64) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x).clamp(-clip, clip)).collect()
}

fn params(active: i64, clip: f64) -> Vec<(&'static str, Value)> {
    vec![
        ("weight", Value::Str("altup".into())),
        ("streams", Value::Int(N as i64)),
        ("dim", Value::Int(D as i64)),
        ("active", Value::Int(active)),
        ("coef_clip", Value::Float(clip)),
        ("eps", Value::Float(1e-6)),
    ]
}

fn dense(v: &[f32], shape: &[i32]) -> Param {
    Param::Dense(Array::from_slice(v, shape))
}

#[test]
fn altup_predict_mixes_the_streams_by_the_routed_coefficients() {
    let (active, clip) = (1usize, 0.3f64);
    let x = noise(T * N * D, 31);
    let norm: Vec<f32> = noise(D, 32).iter().map(|v| 1.0 + 0.1 * v).collect();
    let router = noise(N * D, 33);
    // Some coefficients past the clip.
    let coefs: Vec<f32> = noise(N * N * N, 34).iter().map(|v| 0.5 * v).collect();
    let op = build(
        "altup_predict",
        &params(active as i64, clip),
        &[Layout::flat((N * D) as i64)],
        vec![
            dense(&norm, &[D as i32]),
            dense(&router, &[N as i32, D as i32]),
            dense(&coefs, &[(N * N) as i32, N as i32]),
        ],
    );
    let xs = Array::from_slice(&x, &[1, T as i32, (N * D) as i32]);
    let (x64, c64) = (f64s(&x), clipped(&coefs, clip));
    let mut want = Vec::new();
    for t in 0..T {
        let row = &x64[t * N * D..(t + 1) * N * D];
        let m = modalities(
            &row[active * D..(active + 1) * D],
            &f64s(&norm),
            &f64s(&router),
            1e-6,
        );
        for c in 0..N {
            for d in 0..D {
                let mixed: f64 = (0..N)
                    .map(|a| {
                        let r: f64 = (0..N).map(|k| m[k] * c64[(c * N + a) * N + k]).sum();
                        r * row[a * D + d]
                    })
                    .sum();
                want.push(row[c * D + d] + mixed);
            }
        }
    }
    close(&run(op.as_ref(), &[&xs], 0), &want, 1e-5);
}

#[test]
fn altup_correct_adds_each_stream_its_share_of_the_innovation() {
    let (active, clip) = (0usize, 0.4f64);
    let pred = noise(T * N * D, 41);
    let act = noise(T * D, 42);
    let norm: Vec<f32> = noise(D, 43).iter().map(|v| 1.0 + 0.1 * v).collect();
    let router = noise(N * D, 44);
    let coefs: Vec<f32> = noise(N * N, 45).iter().map(|v| 0.6 * v).collect();
    let op = build(
        "altup_correct",
        &params(active as i64, clip),
        &[Layout::flat((N * D) as i64), Layout::flat(D as i64)],
        vec![
            dense(&norm, &[D as i32]),
            dense(&router, &[N as i32, D as i32]),
            dense(&coefs, &[N as i32, N as i32]),
        ],
    );
    let p = Array::from_slice(&pred, &[1, T as i32, (N * D) as i32]);
    let a = Array::from_slice(&act, &[1, T as i32, D as i32]);
    let (p64, a64, c64) = (f64s(&pred), f64s(&act), clipped(&coefs, clip));
    let mut want = Vec::new();
    for t in 0..T {
        let prow = &p64[t * N * D..(t + 1) * N * D];
        let arow = &a64[t * D..(t + 1) * D];
        let m = modalities(arow, &f64s(&norm), &f64s(&router), 1e-6);
        for c in 0..N {
            let factor = 1.0 + (0..N).map(|k| m[k] * c64[c * N + k]).sum::<f64>();
            for d in 0..D {
                let innovation = arow[d] - prow[active * D + d];
                want.push(prow[c * D + d] + innovation * factor);
            }
        }
    }
    close(&run(op.as_ref(), &[&p, &a], 0), &want, 1e-5);
}

fn gelu_approx(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

#[test]
fn gelu_topk_cuts_each_row_below_its_mean_plus_std_times_the_quantile() {
    // Φ(1): √2 · erfinv(2p − 1) = 1, so the cutoff is mean + std.
    let p = 0.841_344_746_068_542_9;
    let x = noise(T * 8, 51);
    let op = build(
        "gelu_topk",
        &[("sparsity", Value::Float(p))],
        &[Layout::flat(8)],
        vec![],
    );
    let xs = Array::from_slice(&x, &[1, T as i32, 8]);
    let want: Vec<f64> = f64s(&x)
        .chunks(8)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / 8.0;
            let std = (row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0).sqrt();
            row.iter()
                .map(move |v| gelu_approx((v - (mean + std)).max(0.0)))
                .collect::<Vec<_>>()
        })
        .collect();
    close(&run(op.as_ref(), &[&xs], 0), &want, 1e-5);
}

#[test]
fn match_rms_scales_each_head_to_the_reference_and_mean_heads_averages() {
    // x [1, 2 heads, T, D], reference one head [1, 1, T, D].
    let x = noise(2 * T * D, 61);
    let r = noise(T * D, 62);
    let heads = |h: i64| Layout {
        dim: D as i64,
        heads: Some(h),
    };
    let op = build("match_rms", &[], &[heads(2), heads(1)], vec![]);
    let xs = Array::from_slice(&x, &[1, 2, T as i32, D as i32]);
    let rs = Array::from_slice(&r, &[1, 1, T as i32, D as i32]);
    let rms = |v: &[f64]| (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
    let (x64, r64) = (f64s(&x), f64s(&r));
    let mut want = Vec::new();
    for h in 0..2 {
        for t in 0..T {
            let row = &x64[(h * T + t) * D..(h * T + t + 1) * D];
            let target = rms(&r64[t * D..(t + 1) * D]);
            want.extend(row.iter().map(|v| v * target / rms(row)));
        }
    }
    close(&run(op.as_ref(), &[&xs, &rs], 0), &want, 1e-5);
    let op = build("mean_heads", &[], &[heads(2)], vec![]);
    let want: Vec<f64> = (0..T * D)
        .map(|k| (x64[k] + x64[T * D + k]) / 2.0)
        .collect();
    close(&run(op.as_ref(), &[&xs], 0), &want, 1e-6);
}
