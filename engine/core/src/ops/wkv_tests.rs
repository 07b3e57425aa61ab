//! `token_shift` and `wkv7` against mlx-lm's `rwkv7` ops path written out
//! in f64, each fed whole and in pieces through its cache slot.
use lmspec_spec::expr::Value;
use lmspec_spec::ops::{Layout as ValueInfo, StateKind};
use mlx_rs::Array;

use super::super::tests::{build, close, noise, parse, rows, run, run_in_pieces};
use super::super::Param;
use crate::cache::CacheKind;

#[test]
fn token_shift_gives_the_previous_row_whole_and_in_pieces() {
    let (t, d) = (6usize, 3usize);
    let x = noise(t * d, 5);
    let mut want = vec![0.0f64; t * d];
    for p in 1..t {
        for c in 0..d {
            want[p * d + c] = f64::from(x[(p - 1) * d + c]);
        }
    }
    let infos = [ValueInfo::flat(d as i64)];
    let resolved = parse("token_shift", &[])
        .resolve("", &infos)
        .expect("resolve");
    assert_eq!(resolved.state, Some(StateKind::Conv(1)));
    let op = build("token_shift", &[], &infos, Vec::new());
    close(&run(op.as_ref(), &[&rows(&x, d, 0, t)], 0), &want, 0.0);
    // One token at a time (the decode case) and uneven pieces.
    for bounds in [
        vec![(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)],
        vec![(0, 4), (4, 6)],
    ] {
        let got = run_in_pieces(op.as_ref(), CacheKind::Conv(1), &bounds, |a, b| {
            vec![rows(&x, d, a, b)]
        });
        close(&got, &want, 0.0);
    }
}

/// mlx-lm's `Rwkv7TimeMixing` from its projections on, in f64, for one
/// sequence of `t` positions and `h` heads of `d`: inputs `[T, H·D]`,
/// weights `[H, D]`.
fn wkv7_reference(
    [r, w, k, v, a]: [&[f32]; 5],
    [k_k, k_a, r_k, g, bias]: [&[f32]; 5],
    (t, h, d): (usize, usize, usize),
    eps: f64,
) -> Vec<f64> {
    let f = |x: &[f32], i: usize| f64::from(x[i]);
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let mut out = vec![0.0f64; t * h * d];
    for hh in 0..h {
        // state[i][j]: value channel i, key channel j.
        let mut s = vec![vec![0.0f64; d]; d];
        for p in 0..t {
            let at = |x: &[f32], c: usize| f(x, p * h * d + hh * d + c);
            let wt = |x: &[f32], c: usize| f(x, hh * d + c);
            let decay: Vec<f64> = (0..d)
                .map(|c| (-0.606531 * sigmoid(at(w, c))).exp())
                .collect();
            let iclr: Vec<f64> = (0..d).map(|c| sigmoid(at(a, c))).collect();
            let kk: Vec<f64> = (0..d).map(|c| at(k, c) * wt(k_k, c)).collect();
            let len = kk.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-7);
            let kk: Vec<f64> = kk.iter().map(|x| x / len).collect();
            let key: Vec<f64> = (0..d)
                .map(|c| at(k, c) * (1.0 + (iclr[c] - 1.0) * wt(k_a, c)))
                .collect();
            // sab = (S a) bᵀ with a = -kk, b = kk·iclr, from the old state.
            let sa: Vec<f64> = (0..d)
                .map(|i| (0..d).map(|j| s[i][j] * -kk[j]).sum())
                .collect();
            for i in 0..d {
                for j in 0..d {
                    s[i][j] = s[i][j] * decay[j] + at(v, i) * key[j] + sa[i] * kk[j] * iclr[j];
                }
            }
            let y: Vec<f64> = (0..d)
                .map(|i| (0..d).map(|j| s[i][j] * at(r, j)).sum())
                .collect();
            let mean = y.iter().sum::<f64>() / d as f64;
            let var = y.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d as f64;
            let bonus: f64 = (0..d).map(|c| at(r, c) * key[c] * wt(r_k, c)).sum();
            for c in 0..d {
                let normed = (y[c] - mean) / (var + eps).sqrt() * wt(g, c) + wt(bias, c);
                out[p * h * d + hh * d + c] = normed + bonus * at(v, c);
            }
        }
    }
    out
}

#[test]
fn wkv7_matches_the_recurrence_whole_and_in_pieces() {
    let (t, h, d) = (7usize, 2usize, 4usize);
    let width = h * d;
    let ins: Vec<Vec<f32>> = (0..5).map(|i| noise(t * width, 90 + i)).collect();
    let ws: Vec<Vec<f32>> = (0..5).map(|i| noise(width, 80 + i)).collect();
    let eps = 64e-5;
    let want = wkv7_reference(
        [&ins[0], &ins[1], &ins[2], &ins[3], &ins[4]],
        [&ws[0], &ws[1], &ws[2], &ws[3], &ws[4]],
        (t, h, d),
        eps,
    );
    let given = [
        ("weight", Value::Str("attn".into())),
        ("heads", Value::Int(h as i64)),
        ("head_dim", Value::Int(d as i64)),
    ];
    let infos = vec![ValueInfo::flat(width as i64); 5];
    let resolved = parse("wkv7", &given).resolve("", &infos).expect("resolve");
    assert_eq!(resolved.state, Some(StateKind::Recurrent));
    let names: Vec<String> = resolved
        .weights
        .iter()
        .map(|r| format!("{}.{}", r.module, r.suffix))
        .collect();
    assert_eq!(
        names,
        [
            "attn.k_k",
            "attn.k_a",
            "attn.r_k",
            "attn.g_norm.weight",
            "attn.g_norm.bias"
        ]
    );
    let params = ws
        .iter()
        .map(|w| Param::Dense(Array::from_slice(w, &[h as i32, d as i32])))
        .collect();
    let op = build("wkv7", &given, &infos, params);
    let args = |a: usize, b: usize| ins.iter().map(|x| rows(x, width, a, b)).collect::<Vec<_>>();
    let whole = args(0, t);
    let refs: Vec<&Array> = whole.iter().collect();
    close(&run(op.as_ref(), &refs, 0), &want, 1e-4);
    let got = run_in_pieces(
        op.as_ref(),
        CacheKind::Recurrent,
        &[(0, 3), (3, 4), (4, 7)],
        args,
    );
    close(&got, &want, 1e-4);
}
