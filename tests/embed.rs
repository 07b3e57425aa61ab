//! The `bert` spec and the Embedder on all-MiniLM-L6-v2 against the stored
//! mlx-embeddings reference (goldens/minilm/reference.json).
use lmspec::lm::embed::cosine;
use lmspec::lm::{Embedder, Pooling};

use crate::support::{goldens, json_floats, json_ids, library, mlx_lock, read_json};

fn reference() -> serde_json::Value {
    read_json(&goldens().join("minilm/reference.json"))
}

fn embedder() -> Embedder {
    let dir = lmspec::default_embedder().expect("all-MiniLM-L6-v2 installed by .ci/setup.sh");
    Embedder::load(&dir, &crate::support::opts(&library(), None)).expect("load embedder")
}

#[test]
fn minilm_matches_reference_batched_and_alone() {
    let reference = reference();
    let sentences = reference["sentences"].as_array().expect("sentences");
    let texts: Vec<&str> = sentences
        .iter()
        .map(|s| s["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts.len(), 8);
    let _guard = mlx_lock();
    let e = embedder();
    assert_eq!(e.pooling, Pooling::Mean);
    assert!(e.normalize);
    assert_eq!(e.max_tokens, 256);
    let batch = e.embed(&texts).expect("batch");
    for (k, s) in sentences.iter().enumerate() {
        let ids = json_ids(&s["input_ids"]);
        assert_eq!(
            e.tokenize(texts[k]).expect("tokenize"),
            ids,
            "ids of sentence {k}"
        );
        let want = json_floats(&s["embedding"]);
        let alone = e.embed(&texts[k..=k]).expect("alone").remove(0);
        let c_batch = cosine(&batch[k], &want);
        let c_alone = cosine(&alone, &want);
        eprintln!(
            "sentence {k}: {} tokens, cosine batch {c_batch:.9} alone {c_alone:.9}",
            ids.len()
        );
        assert!(c_batch >= 0.99999, "sentence {k}: batch cosine {c_batch}");
        assert!(c_alone >= 0.99999, "sentence {k}: alone cosine {c_alone}");
        let diff = batch[k]
            .iter()
            .zip(&alone)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff < 1e-5,
            "sentence {k}: batch and alone differ by {diff}"
        );
    }
}

#[test]
fn pooling_modes_and_normalisation() {
    let _guard = mlx_lock();
    let mut e = embedder();
    let texts = ["short", "a somewhat longer sentence than the first"];
    let mean = e.embed(&texts).expect("mean");
    for v in &mean {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalised: {norm}");
    }
    e.normalize = false;
    let reference = reference();
    let s = &reference["sentences"][0];
    let raw = e.embed(&[s["text"].as_str().expect("text")]).expect("raw");
    let want = json_floats(&s["mean_pooled"]);
    assert!(cosine(&raw[0], &want) >= 0.99999);
    let scale = raw[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    let want_norm = s["mean_pooled_l2_norm"].as_f64().expect("norm") as f32;
    assert!(
        (scale - want_norm).abs() < 1e-4 * want_norm,
        "{scale} vs {want_norm}"
    );
    // cls and last differ from mean and from each other; max bounds mean.
    let modes = [Pooling::Cls, Pooling::Last, Pooling::Max];
    let pooled: Vec<Vec<f32>> = modes
        .iter()
        .map(|&p| {
            e.pooling = p;
            e.embed(&texts).expect("pool").remove(1)
        })
        .collect();
    e.pooling = Pooling::Mean;
    let mean1 = e.embed(&texts).expect("mean").remove(1);
    assert!(cosine(&pooled[0], &mean1) < 0.999);
    assert!(cosine(&pooled[1], &pooled[0]) < 0.999);
    assert!(pooled[2].iter().zip(&mean1).all(|(m, a)| m >= a));
}
