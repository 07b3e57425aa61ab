//! Helpers the vision-language tests share: a golden case's tensors, its
//! ids and grids, F32 comparisons, and greedy decoding against the golden.
use std::collections::HashMap;
use std::path::PathBuf;

use lmspec::engine::{Model, ModelCache};
use lmspec::lm::generate::GenerateParams;
use lmspec::lm::image_processor::ProcessedImage;
use lmspec::lm::template::ChatContext;
use lmspec::lm::vision::{tower_batch, Grid, VisionModel};
use lmspec::lm::{ChatSession, LanguageModel};
use lmspec::port::diff::diff_tower;
use lmspec::port::tolerance::{compare, Tolerance};
use mlx_rs::ops::indexing::{argmax_axis, TryIndexOp};
use mlx_rs::Array;

use crate::support::{goldens, library, opts, root};

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

/// A golden's images as the processor hands them over: each image's rows
/// of `pixel_values` (its grid's patch count) with its grid.
pub fn golden_images(g: &HashMap<String, Array>) -> Vec<ProcessedImage> {
    let grid = grids(&g["image_grid_thw"]);
    let pixels = g["pixel_values"].as_slice::<f32>().to_vec();
    let width = g["pixel_values"].shape()[1] as usize;
    let mut images = Vec::new();
    let mut start = 0;
    for gr in &grid {
        let n = gr.patches() as usize * width;
        images.push(ProcessedImage {
            pixels: pixels[start..start + n].to_vec(),
            grid: *gr,
            video: false,
        });
        start += n;
    }
    images
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

/// A chat session over `visuals` (images, or videos when `kind` is
/// `"video"`): the first turn answers as one `generate_with_images` call on
/// the same conversation; the second, text only, feeds fewer than
/// `max_fed` tokens (the first turn stays in the cache) and, with
/// `second_from_scratch`, answers as the whole conversation run from
/// scratch.
pub fn assert_chat_turns(
    lm: &LanguageModel,
    visuals: Vec<ProcessedImage>,
    kind: &str,
    max_fed: usize,
    second_from_scratch: bool,
) {
    let params = GenerateParams {
        max_tokens: 5,
        ..GenerateParams::default()
    };
    let ctx = ChatContext {
        add_generation_prompt: true,
        ..Default::default()
    };
    let from_scratch = |messages: serde_json::Value| {
        let ids = lm.chat_prompt(&messages, &ctx).expect("prompt");
        lm.generate_with_images(&ids, &visuals, &params, None, None, &mut |_| {})
            .expect("generate")
            .text
    };
    let user1 = serde_json::json!({"role": "user", "content": [{"type": kind}, {"type": "text", "text": "w5 w6"}]});
    let mut session = ChatSession::new(lm, None, params.clone());
    let a1 = session
        .respond_with_images("w5 w6", visuals.clone(), &mut |_| {})
        .expect("turn 1");
    assert_eq!(a1, from_scratch(serde_json::json!([user1.clone()])));
    let a2 = session.respond("w7 w8").expect("turn 2");
    eprintln!(
        "turn 1 {a1:?}, turn 2 {a2:?}, fed {}",
        session.last_fed_tokens
    );
    assert!(
        session.last_fed_tokens < max_fed,
        "turn 2 fed {} tokens: the cache was not reused",
        session.last_fed_tokens
    );
    if second_from_scratch {
        let whole = serde_json::json!([
            user1,
            {"role": "assistant", "content": a1},
            {"role": "user", "content": "w7 w8"},
        ]);
        assert_eq!(a2, from_scratch(whole), "turn 2");
    }
}

/// `port diff` of a vision golden's tower: every node matches, at least
/// `min_nodes` of them, none left unmatched. Returns the names compared.
pub fn assert_tower_diff_passes(case: &str, min_nodes: usize) -> Vec<String> {
    let golden = goldens().join("vlm").join(case);
    let report = diff_tower(
        &golden.join("model"),
        &golden,
        &opts(&library(), None),
        None,
    )
    .expect("diff");
    assert!(report.passed(), "{}", report.table());
    eprintln!("{case} tower: {} nodes match", report.rows.len());
    assert!(
        report.rows.len() >= min_nodes,
        "{} nodes",
        report.rows.len()
    );
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    report.rows.iter().map(|r| r.name.clone()).collect()
}

/// The first tower node `port diff` names on `case` with the spec file
/// `specs/models/SPEC` edited (`from` replaced by `to`, `from` found
/// `count` times).
pub fn first_divergence_with_edit(
    case: &str,
    spec: &str,
    from: &str,
    to: &str,
    count: usize,
) -> String {
    let golden = goldens().join("vlm").join(case);
    let text = std::fs::read_to_string(root().join("specs/models").join(spec)).expect("spec");
    assert_eq!(text.matches(from).count(), count, "{spec}: {from:?}");
    let dir = tempfile::tempdir().expect("tmp");
    let edited = dir.path().join(spec);
    std::fs::write(&edited, text.replace(from, to)).expect("write");
    let mut o = opts(&library(), None);
    o.spec = Some(edited.display().to_string());
    let report = diff_tower(&golden.join("model"), &golden, &o, None).expect("diff");
    let first = report.first_failure().expect("a divergence");
    eprintln!("{case} with {spec} edited: first divergence {}", first.name);
    first.name.clone()
}
