//! Qwen3-VL's mechanisms against reference computations written out here
//! in f64 (the formulas of mlx-vlm's Qwen3-VL code): interleaved M-RoPE
//! (`_interleaved_position_selector`: pair k reads axis 1 when k mod 3 = 1
//! and k < 3·sections[1], axis 2 when k mod 3 = 2 and k < 3·sections[2],
//! else axis 0), DeepStack's `_deepstack_process` (a level's rows added at
//! the image positions) and the `keep`/`kept` slots that carry a tower
//! block's state past the layer stack.
use lmspec_spec::expr::Value;
use lmspec_spec::ops::Layout as ValueInfo;
use mlx_rs::Array;

use super::tests::{build, close, run};
use super::Ctx;
use crate::inputs::{scoped, ForwardInputs};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(11);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

fn bare_ctx() -> Ctx<'static> {
    Ctx {
        offset: 0,
        key_mask: None,
        positions: None,
        cache: None,
    }
}

#[test]
fn interleaved_mrope_deals_the_pairs_to_the_axes_in_turn() {
    // head 16 (8 pairs), sections [2, 3, 3]: mlx-vlm's selector gives
    // h at pairs 1, 4, 7 and w at 2, 5 (8 is past the head), t elsewhere.
    let (h, t, d) = (2usize, 4usize, 16usize);
    let theta = 10000.0f64;
    let sections = [2usize, 3, 3];
    let mut selector = vec![0usize; d / 2];
    for (dim, offset) in [(1usize, 1usize), (2, 2)] {
        let mut idx = offset;
        while idx < (sections[dim] * 3).min(d / 2) {
            selector[idx] = dim;
            idx += 3;
        }
    }
    assert_eq!(selector, [0, 1, 2, 0, 1, 2, 0, 1]);
    let inv: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
        .collect();
    let pos = [[2i32, 3, 3, 7], [2, 3, 4, 8], [2, 4, 3, 9]];
    let xs = values(h * t * d, 1);
    let half = d / 2;
    let mut want = Vec::new();
    for hh in 0..h {
        for tt in 0..t {
            let row = &xs[(hh * t + tt) * d..(hh * t + tt + 1) * d];
            for i in 0..d {
                let k = i % half;
                let a = f64::from(pos[selector[k]][tt]) * inv[k];
                let rot = match i < half {
                    true => -f64::from(row[i + half]),
                    false => f64::from(row[i - half]),
                };
                want.push(f64::from(row[i]) * a.cos() + rot * a.sin());
            }
        }
    }
    let per_head = ValueInfo {
        dim: d as i64,
        heads: Some(h as i64),
    };
    let secs = Value::List(sections.iter().map(|&n| Value::Int(n as i64)).collect());
    let given = [
        ("sections", secs.clone()),
        ("base", Value::Float(theta)),
        ("interleaved", Value::Bool(true)),
    ];
    let op = build("mrope", &given, &[per_head], vec![]);
    let flat: Vec<i32> = pos.iter().flatten().copied().collect();
    let inputs = ForwardInputs {
        positions: Some(Array::from_slice(&flat, &[3, t as i32])),
        ..ForwardInputs::default()
    };
    let x = Array::from_slice(&xs, &[1, h as i32, t as i32, d as i32]);
    let got = scoped(&inputs, 0, || run(op.as_ref(), &[&x], 0));
    close(&got, &want, 1e-5);
    // The chunked layout reads other axes for the same sections: differs.
    let chunked = build("mrope", &given[..2], &[per_head], vec![]);
    let other = scoped(&inputs, 0, || run(chunked.as_ref(), &[&x], 0));
    let diff = other
        .iter()
        .zip(&want)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    assert!(diff > 1e-3, "interleaving changed nothing ({diff})");
}

#[test]
fn add_features_adds_a_level_at_the_spliced_positions() {
    // Tokens 5 9 9 6 9 (image token 9): splice writes block 0 of the rows
    // at positions 1, 2, 4; add_features(part 1) then adds block 1 there,
    // as mlx-vlm's `hidden.at[image positions].add(level)`.
    let (t, d, parts) = (5usize, 3usize, 2usize);
    let ids = [5i32, 9, 9, 6, 9];
    let image: Vec<usize> = (0..t).filter(|&k| ids[k] == 9).collect();
    let rows = values(image.len() * parts * d, 2);
    let emb = values(t * d, 3);
    let hidden = values(t * d, 4);
    let splice = build(
        "splice",
        &[
            ("token", Value::Int(9)),
            ("parts", Value::Int(parts as i64)),
        ],
        &[ValueInfo::flat(1), ValueInfo::flat(d as i64)],
        vec![],
    );
    let add = build(
        "add_features",
        &[("part", Value::Int(1)), ("parts", Value::Int(parts as i64))],
        &[ValueInfo::flat(d as i64)],
        vec![],
    );
    let inputs = ForwardInputs {
        features: Some(Array::from_slice(
            &rows,
            &[image.len() as i32, (parts * d) as i32],
        )),
        ..ForwardInputs::default()
    };
    let tok = Array::from_slice(&ids, &[1, t as i32]);
    let e = Array::from_slice(&emb, &[1, t as i32, d as i32]);
    let hid = Array::from_slice(&hidden, &[1, t as i32, d as i32]);
    let (spliced, added) = scoped(&inputs, 0, || {
        let mut ctx = bare_ctx();
        let s = splice.forward(&[&tok, &e], &mut ctx).expect("splice");
        let a = add.forward(&[&hid], &mut ctx).expect("add");
        (s, a)
    });
    let (mut want_s, mut want_a) = (Vec::new(), Vec::new());
    for k in 0..t {
        for c in 0..d {
            let (e, h) = (f64::from(emb[k * d + c]), f64::from(hidden[k * d + c]));
            match image.iter().position(|&p| p == k) {
                Some(r) => {
                    want_s.push(f64::from(rows[r * parts * d + c]));
                    want_a.push(h + f64::from(rows[r * parts * d + d + c]));
                }
                None => {
                    want_s.push(e);
                    want_a.push(h);
                }
            }
        }
    }
    close(spliced.as_slice::<f32>(), &want_s, 1e-6);
    close(added.as_slice::<f32>(), &want_a, 1e-6);

    // Without features both pass their input through (decoding steps).
    let none = ForwardInputs::default();
    let same = scoped(&none, 0, || run(add.as_ref(), &[&hid], 0));
    assert_eq!(same, hidden);
    // Features but no splice before it in the forward: an error.
    let err = scoped(&inputs, 0, || add.forward(&[&hid], &mut bare_ctx()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no splice"), "{err}");
}

#[test]
fn kept_reads_what_keep_kept_in_the_same_forward() {
    let (n, d) = (4usize, 3usize);
    let a = Array::from_slice(&values(n * d, 5), &[1, n as i32, d as i32]);
    let b = Array::from_slice(&values(n * d, 6), &[1, n as i32, d as i32]);
    let keep = build(
        "keep",
        &[("slot", Value::Int(1))],
        &[ValueInfo::flat(d as i64)],
        vec![],
    );
    let kept = build(
        "kept",
        &[("slot", Value::Int(1))],
        &[ValueInfo::flat(d as i64)],
        vec![],
    );
    let none = ForwardInputs::default();
    let (passed, got) = scoped(&none, 0, || {
        let mut ctx = bare_ctx();
        let p = keep.forward(&[&a], &mut ctx).expect("keep");
        let g = kept.forward(&[&b], &mut ctx).expect("kept");
        (p, g)
    });
    assert_eq!(passed.as_slice::<f32>(), a.as_slice::<f32>());
    assert_eq!(got.as_slice::<f32>(), a.as_slice::<f32>());
    // A new forward starts with empty slots.
    let err = scoped(&none, 0, || kept.forward(&[&b], &mut bare_ctx()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no keep node"), "{err}");
    // A kept value of another shape than the node's input: an error.
    let short = Array::from_slice(&values(2 * d, 7), &[1, 2, d as i32]);
    let err = scoped(&none, 0, || {
        let mut ctx = bare_ctx();
        keep.forward(&[&short], &mut ctx).expect("keep");
        kept.forward(&[&b], &mut ctx)
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("slot 1 holds"), "{err}");
}
