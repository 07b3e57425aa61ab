//! The newer primitives against reference computations written out here
//! (the formulas of the corresponding mlx / mlx-lm code, in f64).
use indexmap::IndexMap;
use mlx_rs::Array;

use super::{lookup, Ctx, Op, Param, Params, ValueInfo};
use crate::spec::expr::{Expr, Value};

fn params(kind: &str, given: &[(&str, Value)]) -> Params {
    let k = lookup(kind).expect("op");
    let mut values = IndexMap::new();
    for def in k.params() {
        let v = given
            .iter()
            .find(|(n, _)| *n == def.name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| match def.default {
                // Defaults are spec text, evaluated as the expander does.
                Some(d) => Expr::parse(d)
                    .and_then(|e| e.eval(&IndexMap::<String, Value>::new()))
                    .unwrap_or(Value::Str(d.to_string())),
                None => Value::Null,
            });
        values.insert(def.name.to_string(), v);
    }
    Params { values }
}

fn build(kind: &str, given: &[(&str, Value)], inputs: &[ValueInfo], w: Vec<Param>) -> Box<dyn Op> {
    let k = lookup(kind).expect("op");
    let p = params(kind, given);
    k.resolve(&p, "", inputs).expect("resolve");
    k.build(&p, inputs, w).expect("build")
}

fn run(op: &dyn Op, inputs: &[&Array], offset: i32) -> Vec<f32> {
    let mut ctx = Ctx {
        offset,
        key_mask: None,
        cache: None,
    };
    let y = op
        .forward(inputs, &mut ctx)
        .and_then(|y| y.contiguous())
        .expect("forward");
    y.eval().expect("eval");
    y.as_slice::<f32>().to_vec()
}

fn close(a: &[f32], b: &[f64], tol: f64) {
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

/// softmax(cap(scale · q kᵀ)) v over the keys a causal window allows, in f64,
/// for q [Hq, T, D] and k, v [Hk, T, D] (grouped-query heads).
fn reference_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (hq, hk, t, d): (usize, usize, usize, usize),
    scale: f64,
    window: Option<usize>,
    cap: Option<f64>,
) -> Vec<f64> {
    let mut out = vec![0.0; hq * t * d];
    for h in 0..hq {
        let g = h / (hq / hk);
        for i in 0..t {
            let keys: Vec<usize> = (0..=i)
                .filter(|j| window.is_none_or(|w| i - j < w))
                .collect();
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
