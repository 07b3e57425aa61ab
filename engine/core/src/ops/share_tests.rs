//! `fake_quant` against its formula, and attention over keys and values
//! another node published (`kv_out` / `kv_from`) against attention over
//! the same keys and values given directly.
use lmspec_spec::expr::Value;
use lmspec_spec::ops::Layout;
use mlx_rs::Array;

use super::tests::{build, close, parse, run};
use super::{Ctx, Param};

fn heads(h: i64, d: i64) -> Layout {
    Layout {
        dim: d,
        heads: Some(h),
    }
}

#[test]
fn fake_quant_rounds_to_half_even_steps_and_clips_to_int8() {
    let op = build(
        "fake_quant",
        &[("weight", Value::Str("s".into()))],
        &[Layout::flat(6)],
        vec![Param::Dense(Array::from_f32(0.5))],
    );
    let x = Array::from_slice(&[0.26f32, -1.3, 0.25, 0.75, 200.0, -300.0], &[1, 1, 6]);
    // round(x / 0.5) with ties to even (0.5 -> 0, 1.5 -> 2), clipped to
    // [-128, 127], times 0.5.
    let want = [0.5, -1.5, 0.0, 1.0, 63.5, -64.0];
    close(&run(op.as_ref(), &[&x], 0), &want, 0.0);
}

/// Runs attention nodes in order on one context, as a plan does.
fn forward(op: &dyn super::Op, inputs: &[&Array]) -> Result<Vec<f32>, String> {
    let mut ctx = Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    };
    let y = op
        .forward(inputs, &mut ctx)
        .and_then(|y| y.contiguous())
        .map_err(|e| e.what().to_string())?;
    y.eval().map_err(|e| e.what().to_string())?;
    Ok(y.as_slice::<f32>().to_vec())
}

#[test]
fn a_kv_from_node_attends_over_what_a_kv_out_node_published() {
    let attention = |extra: &[(&str, Value)], inputs: &[Layout]| {
        let mut given = vec![("scale", Value::Float(0.5))];
        given.extend(extra.iter().cloned());
        build("attention", &given, inputs, vec![])
    };
    let full = [heads(2, 4), heads(1, 4), heads(1, 4)];
    let publisher = attention(&[("kv_out", Value::Int(3))], &full);
    let plain = attention(&[], &full);
    let reader = attention(&[("kv_from", Value::Int(3))], &[heads(2, 4)]);
    let vals = |seed: f32, n: usize| -> Vec<f32> {
        (0..n).map(|k| ((k as f32 + seed) * 0.37).sin()).collect()
    };
    let q = Array::from_slice(&vals(1.0, 24), &[1, 2, 3, 4]);
    let q2 = Array::from_slice(&vals(7.0, 24), &[1, 2, 3, 4]);
    let k = Array::from_slice(&vals(2.0, 12), &[1, 1, 3, 4]);
    let v = Array::from_slice(&vals(3.0, 12), &[1, 1, 3, 4]);
    crate::cache::shared::clear();
    let missing = forward(reader.as_ref(), &[&q2]).expect_err("nothing published yet");
    assert!(missing.contains("kv_from 3"), "{missing}");
    forward(publisher.as_ref(), &[&q, &k, &v]).expect("publish");
    let shared = forward(reader.as_ref(), &[&q2]).expect("read");
    let direct = forward(plain.as_ref(), &[&q2, &k, &v]).expect("direct");
    assert_eq!(shared, direct, "same keys, values and causal mask");
    crate::cache::shared::clear();
    assert!(
        forward(reader.as_ref(), &[&q2]).is_err(),
        "a new forward starts empty"
    );
}

#[test]
fn kv_sharing_parameters_are_checked_at_resolve() {
    let resolve = |given: &[(&str, Value)], inputs: &[Layout]| {
        let op = parse("attention", given);
        op.resolve("scope", inputs)
            .map(|_| ())
            .map_err(|e| (e.field, e.msg))
    };
    let q = [heads(2, 4)];
    let full = [heads(2, 4), heads(1, 4), heads(1, 4)];
    let scale = ("scale", Value::Float(0.5));
    let from = ("kv_from", Value::Int(0));
    assert!(resolve(&[scale.clone(), from.clone()], &q).is_ok());
    let (field, msg) = resolve(&[scale.clone(), from.clone()], &full).unwrap_err();
    assert_eq!(field, "in", "{msg}");
    let (field, _) = resolve(std::slice::from_ref(&scale), &q).unwrap_err();
    assert_eq!(field, "in");
    let (field, _) = resolve(&[scale.clone(), ("kv_out", Value::Int(-1))], &full).unwrap_err();
    assert_eq!(field, "kv_out");
    let (field, _) = resolve(
        &[scale.clone(), from.clone(), ("kv_out", Value::Int(1))],
        &q,
    )
    .unwrap_err();
    assert_eq!(field, "kv_from");
    // A mask of its own by positions would be ignored: refused.
    let (field, _) = resolve(&[scale, from, ("local_chunk", Value::Int(4))], &q).unwrap_err();
    assert_eq!(field, "kv_from");
}
