//! Norm, activation, rope and attention options (weightless and grouped
//! norms, LayerNorm offsets, clamp, softplus, gains, xIELU, reversed rope,
//! the position scale, head repeats, attention sinks and tiled GQA) against
//! f64 references written out here.
use lmspec_spec::expr::Value;
use lmspec_spec::ops::{lookup, Layout};
use mlx_rs::Array;

use super::tests::{build, close, run};
use super::{Op, Param, Weights};

fn flat(d: i64) -> Layout {
    Layout::flat(d)
}

fn heads(h: i64, d: i64) -> Layout {
    Layout {
        dim: d,
        heads: Some(h),
    }
}

fn f64s(xs: &[f32]) -> Vec<f64> {
    xs.iter().map(|&v| f64::from(v)).collect()
}

fn dense(xs: &[f32], shape: &[i32]) -> Param {
    Param::Dense(Array::from_slice(xs, shape))
}

fn rms(row: &[f64], eps: f64) -> Vec<f64> {
    let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
    row.iter().map(|v| v / (ms + eps).sqrt()).collect()
}

fn layer_norm(row: &[f64], eps: f64) -> Vec<f64> {
    let n = row.len() as f64;
    let mean = row.iter().sum::<f64>() / n;
    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    row.iter()
        .map(|v| (v - mean) / (var + eps).sqrt())
        .collect()
}

const XS: [f32; 8] = [1.0, -2.0, 0.5, 3.0, -0.25, 4.0, -1.5, 2.0];

#[test]
fn weightless_rms_norm_only_normalises() {
    let x = Array::from_slice(&XS, &[1, 2, 4]);
    let op = build(
        "rms_norm",
        &[("eps", Value::Float(1e-5))],
        &[flat(4)],
        vec![],
    );
    let want: Vec<f64> = f64s(&XS).chunks(4).flat_map(|r| rms(r, 1e-5)).collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-6);
}

#[test]
fn grouped_rms_norm_normalises_each_group_then_scales_the_whole_axis() {
    let ws = [1.0f32, 2.0, 0.5, -1.0, 3.0, 1.5, 0.25, 2.0];
    let x = Array::from_slice(&XS, &[1, 1, 8]);
    let given = [
        ("weight", Value::Str("norm".into())),
        ("groups", Value::Int(2)),
        ("eps", Value::Float(1e-6)),
    ];
    let op = build("rms_norm", &given, &[flat(8)], vec![dense(&ws, &[8])]);
    let want: Vec<f64> = f64s(&XS)
        .chunks(4)
        .flat_map(|g| rms(g, 1e-6))
        .zip(&ws)
        .map(|(v, &w)| v * f64::from(w))
        .collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-5);
    let entry = lookup("rms_norm").expect("op");
    let bad = (entry.parse)(&[
        Value::Null,
        Value::Float(1e-6),
        Value::Float(0.0),
        Value::Int(3),
    ]);
    let err = bad
        .expect("parse")
        .resolve("", &[flat(8)])
        .expect_err("8 into 3 groups");
    assert_eq!(err.field, "groups");
}

#[test]
fn layer_norm_offset_scales_by_one_plus_weight_and_weightless_has_no_bias() {
    let (ws, bs) = ([0.5f32, -0.5, 0.0, 1.0], [0.1f32, 0.2, -0.3, 0.0]);
    let x = Array::from_slice(&XS, &[1, 2, 4]);
    let given = [
        ("weight", Value::Str("ln".into())),
        ("offset", Value::Float(1.0)),
    ];
    let w = vec![dense(&ws, &[4]), dense(&bs, &[4])];
    let op = build("layer_norm", &given, &[flat(4)], w);
    let want: Vec<f64> = f64s(&XS)
        .chunks(4)
        .flat_map(|r| layer_norm(r, 1e-5))
        .enumerate()
        .map(|(k, v)| v * (1.0 + f64::from(ws[k % 4])) + f64::from(bs[k % 4]))
        .collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-5);

    let op = build(
        "layer_norm",
        &[("bias", Value::Bool(false))],
        &[flat(4)],
        vec![],
    );
    let want: Vec<f64> = f64s(&XS)
        .chunks(4)
        .flat_map(|r| layer_norm(r, 1e-5))
        .collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-5);
    let entry = lookup("layer_norm").expect("op");
    let defaults: Vec<Value> = entry
        .schema
        .params
        .iter()
        .map(|p| p.default.map_or(Value::Null, |d| d()))
        .collect();
    let err = (entry.parse)(&defaults)
        .expect("parse")
        .resolve("", &[flat(4)])
        .expect_err("bias without weight");
    assert_eq!(err.field, "bias");
}

#[test]
fn clamp_and_softplus_are_elementwise() {
    let x = Array::from_slice(&XS, &[1, 1, 8]);
    let given = [("min", Value::Float(-1.0)), ("max", Value::Float(2.5))];
    let op = build("clamp", &given, &[flat(8)], vec![]);
    let want: Vec<f64> = f64s(&XS).iter().map(|v| v.clamp(-1.0, 2.5)).collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 0.0);
    let op = build("clamp", &[("max", Value::Float(0.0))], &[flat(8)], vec![]);
    let want: Vec<f64> = f64s(&XS).iter().map(|v| v.min(0.0)).collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 0.0);

    let op = build(
        "activation",
        &[("fn", Value::Str("softplus".into()))],
        &[flat(8)],
        vec![],
    );
    let want: Vec<f64> = f64s(&XS).iter().map(|v| (1.0 + v.exp()).ln()).collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-6);
}

/// A gain's value for (head, feature).
type GainAt = Box<dyn Fn(usize, usize) -> f64>;

#[test]
fn gains_broadcast_over_their_shape() {
    // x [B=1, H=2, T=2, D=2]
    let x = Array::from_slice(&XS, &[1, 2, 2, 2]);
    let at = |h: usize, t: usize, d: usize| f64::from(XS[(h * 2 + t) * 2 + d]);
    let cases: [(&str, Vec<f32>, Vec<i32>, GainAt); 4] = [
        ("scalar", vec![1.5], vec![1], Box::new(|_, _| 1.5)),
        (
            "channel",
            vec![2.0, -1.0],
            vec![2],
            Box::new(|_, d| [2.0, -1.0][d]),
        ),
        (
            "head",
            vec![0.5, 3.0],
            vec![2],
            Box::new(|h, _| [0.5, 3.0][h]),
        ),
        (
            "head_channel",
            vec![1.0, 2.0, 3.0, 4.0],
            vec![2, 2],
            Box::new(|h, d| [[1.0, 2.0], [3.0, 4.0]][h][d]),
        ),
    ];
    for (shape, w, wshape, gain) in cases {
        let given = [
            ("weight", Value::Str("g".into())),
            ("shape", Value::Str(shape.into())),
        ];
        let op = build("gain", &given, &[heads(2, 2)], vec![dense(&w, &wshape)]);
        let mut want = Vec::new();
        for h in 0..2 {
            for t in 0..2 {
                for d in 0..2 {
                    want.push(at(h, t, d) * gain(h, d));
                }
            }
        }
        close(&run(op.as_ref(), &[&x], 0), &want, 1e-6);
    }
    let entry = lookup("gain").expect("op");
    let op = (entry.parse)(&[Value::Str("g".into()), Value::Str("head".into())]).expect("parse");
    assert_eq!(
        op.resolve("", &[flat(4)]).expect_err("flat input").field,
        "shape"
    );
}

#[test]
fn xielu_matches_its_formula() {
    let (ap, an, beta, eps) = (0.3f32, -0.2f32, 0.5f32, -1e-6f32);
    let x = Array::from_slice(&XS, &[1, 1, 8]);
    let scalar = |v: f32| Param::Dense(Array::from_f32(v));
    let w = vec![scalar(ap), scalar(an), scalar(beta), scalar(eps)];
    let op = build(
        "xielu",
        &[("weight", Value::Str("act_fn".into()))],
        &[flat(8)],
        w,
    );
    let softplus = |v: f64| (1.0 + v.exp()).ln();
    let (b, e) = (f64::from(beta), f64::from(eps));
    let (pos, neg) = (softplus(f64::from(ap)), b + softplus(f64::from(an)));
    let want: Vec<f64> = f64s(&XS)
        .iter()
        .map(|&v| {
            if v > 0.0 {
                pos * v * v + b * v
            } else {
                ((v.min(e)).exp_m1() - v) * neg + b * v
            }
        })
        .collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-5);
}

/// Half-split rope of one head's features [T, D] at positions offset..,
/// rotated by `sign` · the usual angle p / base^(2j/D).
fn reference_rope(xs: &[f64], t: usize, d: usize, offset: usize, base: f64, sign: f64) -> Vec<f64> {
    let half = d / 2;
    let mut out = xs.to_vec();
    for i in 0..t {
        let p = (offset + i) as f64;
        for j in 0..half {
            let a = sign * p / base.powf(2.0 * j as f64 / d as f64);
            let (x1, x2) = (xs[i * d + j], xs[i * d + j + half]);
            out[i * d + j] = x1 * a.cos() - x2 * a.sin();
            out[i * d + j + half] = x1 * a.sin() + x2 * a.cos();
        }
    }
    out
}

#[test]
fn reversed_rope_turns_the_other_way() {
    let x = Array::from_slice(&XS, &[1, 1, 2, 4]);
    for (reverse, sign) in [(false, 1.0), (true, -1.0)] {
        let given = [
            ("base", Value::Float(100.0)),
            ("reverse", Value::Bool(reverse)),
        ];
        let op = build("rope", &given, &[heads(1, 4)], vec![]);
        let want = reference_rope(&f64s(&XS), 2, 4, 5, 100.0, sign);
        close(&run(op.as_ref(), &[&x], 5), &want, 1e-5);
    }
}

#[test]
fn position_scale_grows_with_the_position() {
    let x = Array::from_slice(&XS, &[1, 1, 4, 2]);
    let given = [("beta", Value::Float(0.5)), ("period", Value::Int(3))];
    let op = build("position_scale", &given, &[heads(1, 2)], vec![]);
    let offset = 4;
    let want: Vec<f64> = f64s(&XS)
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let p = (offset + k / 2) as f64;
            v * (1.0 + 0.5 * (1.0 + (p / 3.0).floor()).ln())
        })
        .collect();
    close(&run(op.as_ref(), &[&x], offset as i32), &want, 1e-6);
}

#[test]
fn position_scale_shift_counts_positions_from_one() {
    // Llama 4: log(floor((p + 1) / period) + 1) * beta + 1; at offset 2 and
    // period 3 the shift moves the first step from position 3 to 2.
    let x = Array::from_slice(&XS, &[1, 1, 4, 2]);
    let given = [
        ("beta", Value::Float(0.1)),
        ("period", Value::Int(3)),
        ("shift", Value::Int(1)),
    ];
    let op = build("position_scale", &given, &[heads(1, 2)], vec![]);
    let offset = 2;
    let want: Vec<f64> = f64s(&XS)
        .iter()
        .enumerate()
        .map(|(k, v)| {
            let p = (offset + k / 2 + 1) as f64;
            v * ((1.0 + (p / 3.0).floor()).ln() * 0.1 + 1.0)
        })
        .collect();
    assert!(want[0] != f64s(&XS)[0], "the first position already scales");
    close(&run(op.as_ref(), &[&x], offset as i32), &want, 1e-6);
}

#[test]
fn mask_tokens_sets_the_listed_logits_to_minus_infinity() {
    // [1, 2, 4] logits; ids 1 and 3 (listed twice), 7 past the vocabulary.
    let x = Array::from_slice(&XS, &[1, 2, 4]);
    let ids = Value::List(vec![
        Value::Int(3),
        Value::Int(1),
        Value::Int(7),
        Value::Int(3),
    ]);
    let op = build("mask_tokens", &[("ids", ids)], &[flat(4)], vec![]);
    let mut want = f64s(&XS);
    for row in 0..2 {
        want[row * 4 + 1] = f64::NEG_INFINITY;
        want[row * 4 + 3] = f64::NEG_INFINITY;
    }
    let got = run(op.as_ref(), &[&x], 0);
    for (g, w) in got.iter().zip(&want) {
        let g = f64::from(*g);
        assert!(g == *w || (g - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    // A negative index is an error naming the field.
    let entry = lookup("mask_tokens").expect("op");
    let config = (entry.parse)(&[Value::List(vec![Value::Int(-2)])]).expect("parse");
    let err = super::build(&config, &[flat(4)], Weights::new(vec![])).expect_err("negative");
    assert_eq!(err.field, "ids");
}

#[test]
fn repeat_heads_repeats_each_head_in_a_row() {
    // [B=1, H=2, T=1, D=4] -> [1, 6, 1, 4]: head 0 three times, then head 1.
    let x = Array::from_slice(&XS, &[1, 2, 1, 4]);
    let op = build(
        "repeat_heads",
        &[("times", Value::Int(3))],
        &[heads(2, 4)],
        vec![],
    );
    let want: Vec<f64> = [0, 0, 0, 1, 1, 1]
        .iter()
        .flat_map(|&h| f64s(&XS[h * 4..h * 4 + 4]))
        .collect();
    close(&run(op.as_ref(), &[&x], 0), &want, 0.0);
}

/// Causal attention in f64 for q [Hq, T, D], k/v [Hk, T, D]: query head h
/// reads key head `map(h)`, with an optional sink logit per query head in
/// every softmax's denominator and an optional tanh cap of the scores.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (hq, t, d): (usize, usize, usize),
    map: impl Fn(usize) -> usize,
    sinks: Option<&[f32]>,
    cap: Option<f64>,
    scale: f64,
) -> Vec<f64> {
    let mut out = vec![0.0; hq * t * d];
    for h in 0..hq {
        let g = map(h);
        for i in 0..t {
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    let s = (0..d)
                        .map(|x| {
                            f64::from(q[(h * t + i) * d + x]) * f64::from(k[(g * t + j) * d + x])
                        })
                        .sum::<f64>()
                        * scale;
                    cap.map_or(s, |c| c * (s / c).tanh())
                })
                .collect();
            let sink = sinks.map(|s| f64::from(s[h]));
            let m = scores.iter().cloned().chain(sink).fold(f64::MIN, f64::max);
            let z = scores.iter().map(|s| (s - m).exp()).sum::<f64>()
                + sink.map_or(0.0, |s| (s - m).exp());
            for (j, s) in scores.iter().enumerate() {
                for x in 0..d {
                    out[(h * t + i) * d + x] +=
                        (s - m).exp() / z * f64::from(v[(g * t + j) * d + x]);
                }
            }
        }
    }
    out
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|k| (((k as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

#[test]
fn attention_sinks_and_tiled_heads_match_the_reference() {
    let (hq, hk, t, d) = (4usize, 2usize, 3usize, 4usize);
    let (qs, ks, vs) = (
        values(hq * t * d, 1),
        values(hk * t * d, 2),
        values(hk * t * d, 3),
    );
    let sinks = [0.5f32, -1.0, 2.0, 0.0];
    let q = Array::from_slice(&qs, &[1, hq as i32, t as i32, d as i32]);
    let k = Array::from_slice(&ks, &[1, hk as i32, t as i32, d as i32]);
    let v = Array::from_slice(&vs, &[1, hk as i32, t as i32, d as i32]);
    let inputs = [heads(4, 4), heads(2, 4), heads(2, 4)];
    // (sinks, gqa, softcap): the fast kernel, and the explicit path (softcap).
    for (with_sinks, gqa, cap) in [
        (true, "grouped", None),
        (false, "tiled", None),
        (true, "tiled", None),
        (true, "grouped", Some(3.0)),
        (true, "tiled", Some(3.0)),
    ] {
        let entry = lookup("attention").expect("op");
        let given = [
            ("scale", Value::Float(0.5)),
            ("sinks", Value::Bool(with_sinks)),
            ("gqa", Value::Str(gqa.into())),
            ("softcap", cap.map_or(Value::Null, Value::Float)),
        ];
        let vals: Vec<Value> = entry
            .schema
            .params
            .iter()
            .map(|p| {
                given
                    .iter()
                    .find(|(n, _)| *n == p.name)
                    .map(|(_, v)| v.clone())
                    .or_else(|| p.default.map(|f| f()))
                    .unwrap_or(Value::Null)
            })
            .collect();
        let op = (entry.parse)(&vals).expect("parse");
        let resolved = op.resolve("layers.0.self_attn", &inputs).expect("resolve");
        assert_eq!(resolved.weights.len(), usize::from(with_sinks));
        let w: Vec<(&'static str, Param)> = resolved
            .weights
            .iter()
            .map(|r| (r.field, dense(&sinks, &[4])))
            .collect();
        let built: Box<dyn Op> = super::build(&op, &inputs, Weights::new(w)).expect("build");
        let map = |h: usize| {
            if gqa == "tiled" {
                h % hk
            } else {
                h / (hq / hk)
            }
        };
        let want = reference(
            &qs,
            &ks,
            &vs,
            (hq, t, d),
            map,
            with_sinks.then_some(&sinks[..]),
            cap,
            0.5,
        );
        close(&run(built.as_ref(), &[&q, &k, &v], 0), &want, 1e-5);
    }
    let entry = lookup("attention").expect("op");
    let mut vals: Vec<Value> = entry
        .schema
        .params
        .iter()
        .map(|p| p.default.map_or(Value::Float(1.0), |f| f()))
        .collect();
    let k = entry
        .schema
        .params
        .iter()
        .position(|p| p.name == "sinks")
        .expect("sinks");
    vals[k] = Value::Bool(true);
    let op = (entry.parse)(&vals).expect("parse");
    assert_eq!(
        op.resolve("", &inputs).expect_err("no scope").field,
        "sinks"
    );
}

#[test]
fn head_linear_adds_each_heads_bias() {
    // x [B=1, H=2, T=1, in=2]; weight [2, out=3, in=2]; bias [2, 3].
    let xs = [1.0f32, 2.0, -1.0, 0.5];
    let ws = [
        1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 2.0, -1.0, 1.0,
    ];
    let bs = [0.1f32, 0.2, 0.3, -0.1, -0.2, -0.3];
    let x = Array::from_slice(&xs, &[1, 2, 1, 2]);
    let given = [
        ("weight", Value::Str("embed_q".into())),
        ("heads", Value::Int(2)),
        ("out", Value::Int(3)),
        ("bias", Value::Bool(true)),
    ];
    let w = vec![dense(&ws, &[2, 3, 2]), dense(&bs, &[2, 3])];
    let op = build("head_linear", &given, &[heads(2, 2)], w);
    let mut want = Vec::new();
    for h in 0..2 {
        for o in 0..3 {
            let dot: f64 = (0..2)
                .map(|k| f64::from(ws[(h * 3 + o) * 2 + k]) * f64::from(xs[h * 2 + k]))
                .sum();
            want.push(dot + f64::from(bs[h * 3 + o]));
        }
    }
    close(&run(op.as_ref(), &[&x], 0), &want, 1e-6);
}

#[test]
fn ngram_embedding_hashes_each_token_with_those_before_it() {
    // vocab 7, dim 12, 3-grams (neighbors 3) with 2 tables per order: 4
    // tables of 3 features, table t with 2 * 7 + 2t + 1 rows.
    let (vocab, dim, ratio, n, k) = (7i64, 12usize, 2i64, 3i64, 2i64);
    let tables = (k * (n - 1)) as usize;
    let width = dim / tables;
    let word = super::tests::noise(vocab as usize * dim, 61);
    let rows_of = |t: usize| (ratio * vocab) as usize + 2 * t + 1;
    let table: Vec<Vec<f32>> = (0..tables)
        .map(|t| super::tests::noise(rows_of(t) * width, 70 + t as u64))
        .collect();
    let proj: Vec<Vec<f32>> = (0..tables)
        .map(|t| super::tests::noise(dim * width, 80 + t as u64))
        .collect();
    let mut w = vec![dense(&word, &[vocab as i32, dim as i32])];
    for t in 0..tables {
        w.push(dense(&table[t], &[rows_of(t) as i32, width as i32]));
        w.push(dense(&proj[t], &[dim as i32, width as i32]));
    }
    let given = [
        ("weight", Value::Str("ngram".into())),
        ("vocab", Value::Int(vocab)),
        ("dim", Value::Int(dim as i64)),
        ("ratio", Value::Int(ratio)),
        ("neighbors", Value::Int(n)),
        ("splits", Value::Int(k)),
    ];
    let op = build("ngram_embedding", &given, &[flat(1)], w);
    let ids: Vec<i32> = vec![3, 6, 0, 5, 5, 1, 4];
    // The reference, as mlx-lm's NgramEmbedding computes it.
    let want: Vec<f64> = (0..ids.len())
        .flat_map(|p| {
            let mut x: Vec<f64> = (0..dim)
                .map(|c| f64::from(word[ids[p] as usize * dim + c]))
                .collect();
            for order in 2..=n {
                for j in 0..k {
                    let t = ((order - 2) * k + j) as usize;
                    let m = rows_of(t) as i64;
                    let mut hash = i64::from(ids[p]);
                    let mut power = 1i64;
                    for s in 1..order {
                        power = power * vocab % m;
                        let before = if p as i64 >= s {
                            i64::from(ids[p - s as usize])
                        } else {
                            0
                        };
                        hash += before * power;
                    }
                    let row = (hash % m) as usize;
                    for c in 0..dim {
                        x[c] += (0..width)
                            .map(|e| {
                                f64::from(table[t][row * width + e])
                                    * f64::from(proj[t][c * width + e])
                            })
                            .sum::<f64>();
                    }
                }
            }
            x.into_iter().map(|v| v / (1 + k * (n - 1)) as f64)
        })
        .collect();
    let whole = Array::from_slice(&ids, &[1, ids.len() as i32]);
    close(&run(op.as_ref(), &[&whole], 0), &want, 1e-5);
    // Through its state: 3 ids, then 1, then 3; the earlier ids carry over.
    use crate::cache::CreateState;
    let mut slot = crate::cache::CacheKind::Conv((n - 1) as i32).create(Default::default());
    let mut got = Vec::new();
    for (a, b) in [(0usize, 3usize), (3, 4), (4, 7)] {
        let mut ctx = super::Ctx {
            offset: a as i32,
            key_mask: None,
            positions: None,
            cache: Some(&mut slot),
        };
        let part = Array::from_slice(&ids[a..b], &[1, (b - a) as i32]);
        let y = op
            .forward(&[&part], &mut ctx)
            .and_then(|y| y.contiguous())
            .expect("forward");
        y.eval().expect("eval");
        got.extend_from_slice(y.as_slice::<f32>());
    }
    close(&got, &want, 1e-5);
}
