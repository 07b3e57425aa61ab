//! `attention` with `bidirectional_spans` against a reference written out
//! in f64: Hugging Face's Gemma 3 mask, causal OR (query and key in one run
//! of image tokens), the softmax over the allowed keys. Whole prompts, and
//! a prompt in two calls through a KV cache (the second call's spans lie in
//! its own positions, after the cached ones).
use lmspec_spec::expr::Value;
use lmspec_spec::ops::Layout as ValueInfo;
use mlx_rs::Array;

use super::tests::{build, close, run};
use super::Ctx;
use crate::cache::CreateState;
use crate::inputs::{scoped, ForwardInputs};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// Attention of one head `[t, d]` where query i sees key j if `allowed`.
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    d: usize,
    scale: f64,
    allowed: impl Fn(usize, usize) -> bool,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(t * d);
    for i in 0..t {
        let keys: Vec<usize> = (0..t).filter(|&j| allowed(i, j)).collect();
        let s: Vec<f64> = keys
            .iter()
            .map(|&j| {
                (0..d)
                    .map(|c| f64::from(q[i * d + c]) * f64::from(k[j * d + c]))
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().copied().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for c in 0..d {
            out.push(
                keys.iter()
                    .zip(&e)
                    .map(|(&j, w)| w / z * f64::from(v[j * d + c]))
                    .sum(),
            );
        }
    }
    out
}

#[test]
fn spans_make_image_tokens_see_each_other_inside_a_causal_mask() {
    // text, image 0 (3 tokens), text, image 1 (2 tokens), text.
    let seg = [-1i32, 0, 0, 0, -1, 1, 1, -1];
    let (t, d) = (seg.len(), 4usize);
    let (qs, ks, vs) = (values(t * d, 1), values(t * d, 2), values(t * d, 3));
    let shape = [1, 1, t as i32, d as i32];
    let (q, k, v) = (
        Array::from_slice(&qs, &shape),
        Array::from_slice(&ks, &shape),
        Array::from_slice(&vs, &shape),
    );
    let scale = 0.5;
    let head = ValueInfo {
        dim: d as i64,
        heads: Some(1),
    };
    let given = [
        ("scale", Value::Float(scale)),
        ("bidirectional_spans", Value::Bool(true)),
    ];
    let op = build("attention", &given, &[head; 3], vec![]);
    let allowed = |i: usize, j: usize| j <= i || (seg[i] >= 0 && seg[i] == seg[j]);
    let want = reference(&qs, &ks, &vs, t, d, scale, allowed);
    let inputs = ForwardInputs {
        segments: Some(Array::from_slice(&seg, &[t as i32])),
        ..ForwardInputs::default()
    };
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&q, &k, &v], 0));
    close(&got, &want, 1e-5);
    // Without segment ids: plain causal attention, a different result.
    let causal = reference(&qs, &ks, &vs, t, d, scale, |i, j| j <= i);
    close(&run(op.as_ref(), &[&q, &k, &v], 0), &causal, 1e-5);
    assert!(
        want.iter().zip(&causal).any(|(a, b)| (a - b).abs() > 1e-3),
        "the spans changed nothing"
    );

    // Through a KV cache: the first 4 positions, then the last 4 with
    // their own segment ids.
    let mut slot = crate::cache::CacheKind::Kv.create(Default::default());
    let mut got = Vec::new();
    for (a, b) in [(0usize, 4usize), (4, 8)] {
        let part =
            |x: &[f32]| Array::from_slice(&x[a * d..b * d], &[1, 1, (b - a) as i32, d as i32]);
        let inputs = ForwardInputs {
            segments: Some(Array::from_slice(&seg[a..b], &[(b - a) as i32])),
            ..ForwardInputs::default()
        };
        let mut ctx = Ctx {
            offset: a as i32,
            key_mask: None,
            positions: None,
            cache: Some(&mut slot),
        };
        let y = scoped(&inputs, 0, || {
            op.forward(&[&part(&qs), &part(&ks), &part(&vs)], &mut ctx)
        })
        .and_then(|y| y.contiguous())
        .expect("forward");
        y.eval().expect("eval");
        got.extend_from_slice(y.as_slice::<f32>());
    }
    close(&got, &want, 1e-5);
}

#[test]
fn spans_belong_to_causal_attention() {
    let head = ValueInfo {
        dim: 4,
        heads: Some(1),
    };
    let op = super::tests::parse(
        "attention",
        &[
            ("scale", Value::Float(0.5)),
            ("causal", Value::Bool(false)),
            ("bidirectional_spans", Value::Bool(true)),
        ],
    );
    let err = op.resolve("", &[head; 3]).expect_err("refused").to_string();
    assert!(err.contains("bidirectional_spans"), "{err}");
}

#[test]
fn splice_scales_the_feature_rows_it_writes() {
    // Tokens [1, 9, 9, 2] with 9 the image token: rows 1 and 2 become the
    // two feature rows times the scale (mlx-vlm's Gemma 3 divides its
    // features by sqrt(hidden) before the embedding scale).
    let d = 3usize;
    let emb = values(4 * d, 4);
    let feats = values(2 * d, 5);
    let op = build(
        "splice",
        &[("token", Value::Int(9)), ("scale", Value::Float(0.25))],
        &[ValueInfo::flat(1), ValueInfo::flat(d as i64)],
        vec![],
    );
    let tokens = Array::from_slice(&[1i32, 9, 9, 2], &[1, 4]);
    let e = Array::from_slice(&emb, &[1, 4, d as i32]);
    let inputs = ForwardInputs {
        features: Some(Array::from_slice(&feats, &[2, d as i32])),
        ..ForwardInputs::default()
    };
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&tokens, &e], 0));
    let mut want: Vec<f64> = emb.iter().map(|&x| f64::from(x)).collect();
    for (k, f) in feats.iter().enumerate() {
        want[d + k] = f64::from(*f) * 0.25;
    }
    close(&got, &want, 1e-7);
}
