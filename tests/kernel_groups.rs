//! The plan's GPU kernel groups: the runs of nodes one GPU kernel computes
//! for a decode step. On the CPU a group runs its ops as the graph lists
//! them, so a model loaded with groups decodes exactly as one loaded without;
//! the groups found are the ones the kernels are meant for.
use lmspec::engine::gpu_kernels;
use lmspec::engine::model::Model;
use mlx_rs::ops::indexing::IndexOp;
use mlx_rs::Array;

use crate::support::{goldens, library, mlx_lock, opts};

/// A golden case's model, with kernel groups or without; projections are
/// not fused either way (a fused product sums in another order).
fn load(case: &str, grouped: bool) -> Model {
    let lib = library();
    let path = goldens().join(case).join("model");
    let o = opts(&lib, None).with_fusion(false);
    let load = || Model::load(&path, &o).expect("model loads");
    if grouped {
        gpu_kernels::with_grouping(load)
    } else {
        load()
    }
}

/// The logits of a 5-token prompt's last row, then of 4 greedy decode
/// steps of one token each.
fn decode(model: &Model) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut tokens = Array::from_slice(&[1i32, 5, 9, 2, 7], &[1, 5]);
    let mut out = Vec::new();
    for _ in 0..5 {
        let logits = model.forward(&tokens, Some(&mut cache)).expect("forward");
        let t = logits.shape()[1];
        let last = logits
            .index((.., t - 1, ..))
            .as_dtype(mlx_rs::Dtype::Float32)
            .expect("logits as float32");
        last.eval().expect("logits evaluate");
        let row = last.as_slice::<f32>().to_vec();
        let next = row
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as i32)
            .expect("logits are not empty");
        out.push(row);
        tokens = Array::from_slice(&[next], &[1, 1]);
    }
    out
}

#[test]
fn a_llama_layer_is_four_groups() {
    let _g = mlx_lock();
    let model = load("llama", true);
    let groups = model.kernel_groups();
    let layers = 2;
    let count = |s: &str| groups.iter().filter(|g| g.starts_with(s)).count();
    // The norm, q, k and v, their heads and the two RoPEs.
    let attention_in =
        "rms_norm+linear+linear+linear+split_heads+split_heads+split_heads+rope+rope: ";
    assert_eq!(count(attention_in), layers, "{groups:?}");
    assert_eq!(count("rms_norm+linear+linear+glu: "), layers, "{groups:?}");
    // The output projection with the heads merged before it, and the
    // down projection, each with its residual.
    assert_eq!(count("merge_heads+linear+add: "), layers, "{groups:?}");
    assert_eq!(count("linear+add: "), layers, "{groups:?}");
    // The final norm and the (untied) head.
    assert_eq!(count("rms_norm+linear: "), 1, "{groups:?}");
    assert_eq!(groups.len(), 4 * layers + 1, "{groups:?}");
    // No GPU here: every group runs its ops.
    assert!(groups.iter().all(|g| g.ends_with(": ops")), "{groups:?}");
    assert!(load("llama", false).kernel_groups().is_empty());
}

#[test]
fn grouped_decoding_equals_ungrouped() {
    let _g = mlx_lock();
    // Dense and quantized weights, SwiGLU and GeGLU, projections with
    // biases (left out of the groups) and a (1 + w) norm.
    for case in ["llama", "llama_q4", "gemma3", "qwen2", "phi3"] {
        let grouped = load(case, true);
        assert!(!grouped.kernel_groups().is_empty(), "{case}: no groups");
        let plain = load(case, false);
        assert_eq!(decode(&grouped), decode(&plain), "{case}");
    }
}

#[test]
fn every_golden_case_passes_with_groups() {
    let _g = mlx_lock();
    let lib = library();
    for case in crate::golden::CASES {
        let dir = goldens().join(case);
        let r = gpu_kernels::with_grouping(|| {
            lmspec::port::golden::run(&dir, &crate::support::opts(&lib, None))
        })
        .unwrap_or_else(|e| panic!("{case}: {e:#}"));
        assert!(r.passed(), "{case} with kernel groups:\n{r:?}");
    }
}
