//! Helpers the vision-language tests share: a golden case's tensors, its
//! ids and grids, F32 comparisons, and greedy decoding against the golden.
use std::collections::HashMap;
use std::path::PathBuf;

use lmspec::engine::{Model, ModelCache};
use lmspec::lm::vision::{tower_batch, Grid, VisionModel};
use lmspec::port::tolerance::{compare, Tolerance};
use mlx_rs::ops::indexing::{argmax_axis, TryIndexOp};
use mlx_rs::Array;

use crate::support::goldens;

/// `goldens/vlm/CASE/golden.safetensors`.
pub fn golden(case: &str) -> HashMap<String, Array> {
    let file = goldens().join("vlm").join(case).join("golden.safetensors");
    Array::load_safetensors(&file).expect("golden tensors")
}

/// `goldens/vlm/CASE/model`.
pub fn model_dir(case: &str) -> PathBuf {
    goldens().join("vlm").join(case).join("model")
}

pub fn ints(a: &Array) -> Vec<i64> {
    let a = a.as_dtype(mlx_rs::Dtype::Int64).expect("cast");
    a.as_slice::<i64>().to_vec()
}

/// `[images, 3]` rows of (t, h, w).
pub fn grids(a: &Array) -> Vec<Grid> {
    ints(a)
        .chunks(3)
        .map(|g| Grid {
            t: g[0],
            h: g[1],
            w: g[2],
        })
        .collect()
}

pub fn max_abs(got: &Array, want: &Array) -> f32 {
    let d = mlx_rs::ops::subtract(got, want)
        .and_then(|d| mlx_rs::ops::abs(&d))
        .and_then(|d| d.max(None))
        .expect("diff");
    d.item_cast::<f32>()
}

/// `got` (reshaped to `want`'s shape) within the float32 tolerance.
pub fn assert_close(what: &str, got: &Array, want: &Array) {
    let got = got.reshape(want.shape()).expect("shape");
    let s = compare(&got, want).unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!(
        "{what}: max_rel {:.2e} max_abs {:.2e} cos {:.9}",
        s.max_rel(),
        max_abs(&got, want),
        s.cosine
    );
    assert!(s.within(Tolerance::F32), "{what}: {s:?}");
}

/// Greedy decoding from the prompt's `logits` (its cache filled by the
/// prefill) against the golden's `greedy_tokens`, each step's logits
/// against `decode_logits`; returns the worst step's max abs difference.
pub fn assert_greedy_steps(
    text: &Model,
    cache: &mut ModelCache,
    logits: &Array,
    g: &HashMap<String, Array>,
) -> f32 {
    let want_tokens = ints(&g["greedy_tokens"]);
    let want_steps = &g["decode_logits"];
    let mut last = logits.try_index((.., -1, ..)).expect("last");
    let mut tokens = Vec::new();
    let mut worst = 0f32;
    for step in 0..want_tokens.len() {
        let tok = ints(&argmax_axis(&last, -1, None).expect("argmax"))[0];
        tokens.push(tok);
        let x = Array::from_slice(&[tok as i32], &[1, 1]);
        let out = text.forward(&x, Some(cache)).expect("decode");
        last = out.try_index((.., -1, ..)).expect("last");
        let want = want_steps.try_index(step as i32).expect("step");
        let got = last.reshape(&[-1]).expect("flat");
        let s = compare(&got, &want).expect("compare");
        assert!(s.within(Tolerance::F32), "decode step {step}: {s:?}");
        worst = worst.max(max_abs(&got, &want));
    }
    eprintln!("decode steps: max abs diff {worst:.2e}");
    assert_eq!(tokens, want_tokens, "greedy tokens");
    worst
}

/// The tower run on `pixels` without its per-image segments: the images
/// then attend to each other, so the features must move away from `want`.
pub fn assert_segments_matter(vm: &VisionModel, pixels: &Array, grid: &[Grid], want: &Array) {
    let (batch, mut inputs) = tower_batch(&vm.tower, pixels, grid, vm.merge).expect("batch");
    inputs.segments = None;
    let (mixed, _) = vm.tower.encode(&batch, &inputs, &[]).expect("encode");
    let mixed = mixed.reshape(&[-1, mixed.shape()[2]]).expect("flat");
    let gap = max_abs(&mixed, want);
    eprintln!("features without segments differ by {gap:.3e}");
    assert!(gap > 1e-3, "the segments changed nothing ({gap})");
}
