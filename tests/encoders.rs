//! Encoder specs (roberta, xlm-roberta, distilbert, nomic_bert, modernbert,
//! qwen3 and gemma3 as embedders) and the cross-encoder reranker against the
//! tiny references in goldens/embeddings/ (porting-tools/python/
//! make_encoder_goldens.py): per case, 8 sentences (one past the longest
//! input, one non-ASCII) tokenized alike, embeddings with cosine >= 0.99999,
//! the batch equal to one text at a time.
use std::path::PathBuf;

use lmspec::lm::embed::cosine;
use lmspec::lm::{Embedder, Reranker};

use crate::support::{goldens, json_floats, json_ids, library, mlx_lock, read_json};

fn case_dir(case: &str) -> PathBuf {
    goldens().join("embeddings").join(case)
}

fn reference(case: &str) -> serde_json::Value {
    read_json(&case_dir(case).join("reference.json"))
}

fn embedder(case: &str) -> Embedder {
    let dir = case_dir(case).join("model");
    Embedder::load(&dir, &crate::support::opts(&library(), None))
        .unwrap_or_else(|e| panic!("{case}: {e}"))
}

/// One case: ids, cosine to the reference, batch against one-by-one.
fn check_case(case: &str, spec: &str) {
    let reference = reference(case);
    let sentences = reference["sentences"].as_array().expect("sentences");
    let texts: Vec<&str> = sentences
        .iter()
        .map(|s| s["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts.len(), 8);
    let _guard = mlx_lock();
    let mut e = embedder(case);
    assert_eq!(e.model().spec.name, spec);
    if let Some(p) = reference["prompt"].as_str() {
        e.use_prompt(p).expect("prompt");
    }
    let batch = e.embed(&texts).expect("batch");
    let mut truncated = 0;
    for (k, s) in sentences.iter().enumerate() {
        let want_ids = json_ids(&s["input_ids"]);
        assert_eq!(
            e.tokenize(texts[k]).expect("tokenize"),
            want_ids,
            "{case}: ids of sentence {k}"
        );
        if s["n_tokens_untruncated"].as_u64().expect("n") as usize > want_ids.len() {
            truncated += 1;
        }
        let want = json_floats(&s["embedding"]);
        let alone = e.embed(&texts[k..=k]).expect("alone").remove(0);
        let (c_batch, c_alone) = (cosine(&batch[k], &want), cosine(&alone, &want));
        eprintln!(
            "{case} sentence {k}: {} tokens, cosine batch {c_batch:.9} alone {c_alone:.9}",
            want_ids.len()
        );
        assert!(
            c_batch >= 0.99999,
            "{case} sentence {k}: batch cosine {c_batch}"
        );
        assert!(
            c_alone >= 0.99999,
            "{case} sentence {k}: alone cosine {c_alone}"
        );
        let diff = batch[k]
            .iter()
            .zip(&alone)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff < 1e-5,
            "{case} sentence {k}: batch and alone differ by {diff}"
        );
        // Unnormalised cases: the scale matches too.
        let (n, m) = (norm(&batch[k]), norm(&want));
        assert!(
            (n - m).abs() <= 1e-4 * m.max(1.0),
            "{case} sentence {k}: norm {n} vs {m}"
        );
    }
    assert!(
        truncated >= 1,
        "{case}: one sentence is past the longest input"
    );
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[test]
fn xlm_roberta() {
    check_case("xlm_roberta", "roberta");
}

#[test]
fn roberta_cls_pooling() {
    check_case("roberta", "roberta");
}

#[test]
fn distilbert_max_pooling() {
    check_case("distilbert", "distilbert");
}

#[test]
fn nomic_bert_mean_sqrt_len_pooling() {
    check_case("nomic_bert", "nomic_bert");
}

#[test]
fn modernbert_local_and_global_attention() {
    check_case("modernbert", "modernbert");
}

#[test]
fn qwen3_embedding_last_token_with_instruction() {
    check_case("qwen3_embedding", "qwen3_embed");
}

#[test]
fn gemma3_embedding_dense_layers() {
    check_case("gemma3_embedding", "gemma3_embed");
}

/// Matryoshka truncation keeps the first dimensions and normalises again.
#[test]
fn dimensions_truncate_and_renormalise() {
    let _guard = mlx_lock();
    let mut e = embedder("gemma3_embedding");
    assert_eq!(e.dim(), 32);
    let full = e.embed(&["Hello!"]).expect("full").remove(0);
    e.set_dimensions(Some(8)).expect("8 dims");
    let short = e.embed(&["Hello!"]).expect("short").remove(0);
    assert_eq!(short.len(), 8);
    assert!((norm(&short) - 1.0).abs() < 1e-5);
    assert!(cosine(&short, &full[..8]) > 0.999_999);
    let err = e.set_dimensions(Some(33)).expect_err("too many");
    assert!(err.to_string().contains("--dimensions 33"), "{err}");
}

#[test]
fn reranker_scores_and_order_match_reference() {
    let reference = reference("reranker");
    let query = reference["query"].as_str().expect("query");
    let docs: Vec<&str> = reference["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .map(|d| d.as_str().expect("doc"))
        .collect();
    let want = json_floats(&reference["scores"]);
    let order: Vec<usize> = reference["order"]
        .as_array()
        .expect("order")
        .iter()
        .map(|k| k.as_u64().expect("k") as usize)
        .collect();
    let _guard = mlx_lock();
    let dir = case_dir("reranker").join("model");
    let r = Reranker::load(&dir, &crate::support::opts(&library(), None)).expect("reranker");
    for (k, d) in docs.iter().enumerate() {
        assert_eq!(
            r.tokenize_pair(query, d).expect("pair"),
            json_ids(&reference["input_ids"][k]),
            "ids of pair {k}"
        );
    }
    let scores = r.score(query, &docs).expect("scores");
    for (k, (got, want)) in scores.iter().zip(&want).enumerate() {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "document {k}: score {got} vs {want}"
        );
    }
    let ranked = r.rerank(query, &docs, None).expect("rerank");
    let got: Vec<usize> = ranked.iter().map(|(k, _)| *k).collect();
    assert_eq!(got, order);
    let top = r.rerank(query, &docs, Some(3)).expect("top 3");
    assert_eq!(top, ranked[..3].to_vec());
    // One document at a time scores the same as the batch.
    let alone = r.score(query, &docs[4..=4]).expect("alone");
    assert!((alone[0] - scores[4]).abs() < 1e-5);
}
