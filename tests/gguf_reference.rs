//! The second real model, google/gemma-3-270m as llama.cpp's Q4_K_M GGUF
//! (installed by the setup), against llama.cpp itself
//! (`goldens/gemma3_270m_gguf/llama_cpp.json`, made by
//! `porting-tools/python/make_llama_cpp_reference.py`): the prompts' token
//! ids, 32 greedy tokens, and the memory the model takes as stored.
use lmspec::lm::generate::{Event, GenerateParams};

use lmspec::engine::cpu_kernels::Activations;

use crate::support::{goldens, library, mlx_lock};

/// llama.cpp does not agree with itself closer than this: its logits for the
/// same tokens run as one batch and step by step differ by up to 0.9, and
/// its greedy choice flips at top-2 margins up to 0.25 (the fixture's
/// `batched_check`). A greedy continuation may part from llama.cpp's only at
/// a step whose llama.cpp margin is below this.
const NEAR_TIE: f64 = 0.25;
/// The first step's top-5 logits agree with llama.cpp's within this (about
/// llama.cpp's own batched/step-by-step difference).
const FIRST_STEP_TOLERANCE: f32 = 1.0;

#[test]
fn gemma3_270m_matches_llama_cpp() {
    against_llama_cpp(Activations::Float);
}

/// With llama.cpp's numerics (activations quantized to 8 bits, dense rows
/// one dot product per output) the same holds.
#[test]
fn gemma3_270m_with_int8_activations_matches_llama_cpp() {
    against_llama_cpp(Activations::Int8);
}

/// With 16-bit activations (float32's numerics within a bound, the
/// sigmoid form of the GELU) the same holds.
#[test]
fn gemma3_270m_with_int16_activations_matches_llama_cpp() {
    against_llama_cpp(Activations::Int16);
}

fn against_llama_cpp(activations: Activations) {
    let path = lmspec::installed_model("gemma3-270m").expect("installed by the setup");
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(goldens().join("gemma3_270m_gguf/llama_cpp.json"))
            .expect("fixture"),
    )
    .expect("json");
    let _guard = mlx_lock();
    // Other tests of this process may hold models of their own: the memory
    // this model takes is what generation peaks at above that baseline.
    mlx_rs::memory::clear_cache().expect("clear cache");
    let baseline = lmspec::engine::memory::active_bytes().expect("active memory");
    let opts = crate::support::opts(&library(), None).with_activations(activations);
    let lm = lmspec::lm::LanguageModel::load(&path, &opts).expect("gemma3-270m loads");
    let params = GenerateParams {
        max_tokens: 32,
        ..Default::default()
    };
    let prompts = fixture["prompts"].as_array().expect("prompts");
    let mut equal = 0;
    let mut report = Vec::new();
    let mut peak = 0;
    for p in prompts {
        let text = p["text"].as_str().expect("text");
        let want_ids: Vec<u32> = serde_json::from_value(p["prompt_ids"].clone()).expect("ids");
        let ids = lm.tokenizer.encode(text).expect("encodes");
        assert_eq!(ids, want_ids, "token ids of {text:?}");
        let first = first_step_logits(&lm.model, &ids);
        for pair in p["first_step_top5"].as_array().expect("top5") {
            let (id, logit) = (
                pair[0].as_u64().expect("id") as usize,
                pair[1].as_f64().expect("logit") as f32,
            );
            assert!(
                (first[id] - logit).abs() < FIRST_STEP_TOLERANCE,
                "{text:?}: logit of {id}: {} vs llama.cpp {logit}",
                first[id]
            );
        }
        let want: Vec<u32> = serde_json::from_value(p["greedy_ids"].clone()).expect("greedy");
        let out = lm
            .generate(&ids, &params, None, None, &mut |e| {
                if let Event::Info(i) = e {
                    peak = peak.max(i.peak_memory_bytes.saturating_sub(baseline));
                }
            })
            .expect("generates");
        match out.tokens.iter().zip(&want).position(|(a, b)| a != b) {
            None if out.tokens.len() == want.len() => equal += 1,
            at => {
                let step = at.unwrap_or(out.tokens.len().min(want.len()));
                let margin = p["steps"][step]["margin"].as_f64().unwrap_or(f64::INFINITY);
                // llama.cpp's own batched run parts from its step-by-step
                // run at this very step.
                let llama_parts_here =
                    p["batched_check"]["first_diff_step"].as_u64() == Some(step as u64);
                report.push(format!(
                    "{text:?}: parts from llama.cpp at step {step} (llama.cpp's top-2 margin there {margin:.3}{})",
                    if llama_parts_here { "; llama.cpp batched parts there too" } else { "" }
                ));
                assert!(
                    margin < NEAR_TIE || llama_parts_here,
                    "{}",
                    report.join("; ")
                );
            }
        }
        if text.starts_with("Water boils") {
            assert!(
                out.text.starts_with(" 100 degrees Celsius"),
                "{:?}",
                out.text
            );
        }
        if text.starts_with("The capital of France") {
            // A base model: neither engine answers the question.
            assert!(!out.text.contains("Paris"), "{:?}", out.text);
        }
    }
    eprintln!(
        "gemma3-270m, {} activations: {equal}/{} greedy continuations equal llama.cpp's; peak {:.1} MB{}",
        activations.name(),
        prompts.len(),
        peak as f64 / 1e6,
        report
            .iter()
            .map(|r| format!("\n  {r}"))
            .collect::<String>()
    );
    // Loaded as stored (quantized), not expanded to float32 (>1 GB).
    assert!(peak < 400_000_000, "peak {peak} bytes");
}

/// The last row of one forward pass, as float32.
fn first_step_logits(model: &lmspec::engine::Model, ids: &[u32]) -> Vec<f32> {
    let ids: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    let input = mlx_rs::Array::from_slice(&ids, &[1, ids.len() as i32]);
    crate::support::last_row_f32(&model.forward(&input, None).expect("forward"))
}
