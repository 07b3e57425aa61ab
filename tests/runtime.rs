//! The runtime around generation: speculative decoding (greedy output equal
//! to plain decoding, refusal of caches that cannot rewind), raw token
//! streams, generation handles that cancel and join, memory tickets around a
//! generation, chat sessions saved and restored, and XTC against mlx-lm.
use std::process::Command;

use lmspec::engine::memory::{MemoryManager, MemoryPolicy, TicketKind};
use lmspec::engine::model::{Model, WeightPlan};
use lmspec::lm::generate::{
    Event, GenerateParams, GeneratedToken, StopReason, TokenGenerator, TokenSource,
};
use lmspec::lm::sampling::apply_xtc;
use lmspec::lm::speculative::{Draft, SpeculativeGenerator};
use lmspec::lm::{ChatSession, LanguageModel};

use crate::generation::{default_model, smollm2};
use crate::support::{goldens, json_floats, library, load_model, mlx_lock, root};

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..Default::default()
    }
}

fn golden(name: &str) -> Model {
    load_model(&goldens().join(name).join("model"), &library(), None).expect("golden loads")
}

fn drain(source: &mut dyn TokenSource) -> Vec<GeneratedToken> {
    let mut out = Vec::new();
    while let Some(t) = source.next_token() {
        out.push(t.expect("token"));
    }
    out
}

const PROMPT: [u32; 7] = [5, 17, 42, 99, 3, 250, 7];

#[test]
fn speculative_greedy_equals_plain_greedy_on_goldens() {
    let _g = mlx_lock();
    let main = golden("llama");
    let mut params = greedy(32);
    params.logprobs = true;
    let mut cache = main.new_cache();
    let mut plain =
        TokenGenerator::new(&main, &mut cache, &PROMPT, &params, &mut |_, _| {}).expect("plain");
    let want = drain(&mut plain);
    drop(plain);
    // A draft of the same vocabulary but other weights (many rejections),
    // and the model drafting for itself (every draft accepted).
    for (draft_name, k) in [("gemma2", 3), ("llama", 4)] {
        let draft = golden(draft_name);
        let mut cache = main.new_cache();
        let mut spec = SpeculativeGenerator::new(
            &main,
            Draft {
                model: &draft,
                num_draft_tokens: k,
            },
            &mut cache,
            &PROMPT,
            &params,
            &mut |_, _| {},
        )
        .expect("speculative");
        let got = drain(&mut spec);
        let ids = |v: &[GeneratedToken]| v.iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(&got), ids(&want), "draft {draft_name}");
        for (a, b) in got.iter().zip(&want) {
            let (a, b) = (a.logprob.expect("asked"), b.logprob.expect("asked"));
            assert!(
                (a - b).abs() < 1e-4,
                "draft {draft_name}: logprob {a} vs {b}"
            );
        }
        let stats = spec.draft_stats().expect("drafting");
        assert!(stats.drafted > 0);
        let from_draft = got.iter().filter(|t| t.from_draft).count();
        assert_eq!(from_draft, stats.accepted, "draft {draft_name}");
        if draft_name == "llama" {
            assert_eq!(stats.accepted, stats.drafted, "a model agrees with itself");
        } else {
            assert!(stats.accepted < stats.drafted, "{stats:?}");
        }
    }
}

#[test]
fn speculative_decoding_refuses_caches_that_cannot_rewind() {
    let _g = mlx_lock();
    let main = golden("mamba2");
    let mut cache = main.new_cache();
    let params = greedy(8);
    let err = SpeculativeGenerator::new(
        &main,
        Draft {
            model: &main,
            num_draft_tokens: 2,
        },
        &mut cache,
        &PROMPT,
        &params,
        &mut |_, _| {},
    )
    .expect_err("refused")
    .to_string();
    assert!(err.contains("rewound"), "{err}");
}

const PROMPTS: [&str; 5] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a cache is in one sentence.",
    "Say hello in Spanish.",
];

#[test]
fn speculative_text_on_the_default_model_equals_plain_greedy() {
    let draft = smollm2();
    let _g = mlx_lock();
    let opts = lmspec::engine::model::LoadOptions::default()
        .with_library(library())
        .with_weights(WeightPlan::Dense);
    let main = LanguageModel::load(&default_model(), &opts).expect("dense SmolLM2");
    draft.perform(|d| {
        let spec = Draft {
            model: &d.model,
            num_draft_tokens: 3,
        };
        let mut accepted = 0;
        for p in PROMPTS {
            let ids = main
                .chat_prompt(
                    &serde_json::json!([{"role": "user", "content": p}]),
                    &lmspec::lm::template::ChatContext {
                        add_generation_prompt: true,
                        ..Default::default()
                    },
                )
                .expect("prompt");
            let params = greedy(24);
            let plain = main
                .generate(&ids, &params, None, None, &mut |_| {})
                .expect("plain");
            let fast = main
                .generate_speculative(&ids, &params, &spec, None, None, &mut |_| {})
                .expect("speculative");
            assert_eq!(fast.text, plain.text, "prompt {p:?}");
            let stats = fast.info.draft.expect("draft stats");
            accepted += stats.accepted;
            // The raw token stream gives the same ids.
            let mut cache = main.model.new_cache();
            let raw: Vec<u32> = main
                .generate_tokens(&ids, &params, &mut cache, None)
                .expect("stream")
                .map(|t| t.expect("token").id)
                .collect();
            assert_eq!(raw, plain.tokens, "prompt {p:?}");
        }
        assert!(accepted > 0, "a quantized copy agrees with the model often");
    });
}

#[test]
fn a_consumer_that_stops_early_leaves_nothing_running() {
    let container = smollm2().clone();
    let _g = mlx_lock();
    let prompt = container
        .perform(|m| m.tokenizer.encode("Once upon a time"))
        .expect("encode");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    let manager = MemoryManager::with_limit_fn(MemoryPolicy::Sum { cap: None }, 1000, move |l| {
        log.lock().unwrap().push(l)
    });
    let ticket = manager.ticket(24, TicketKind::Active);
    let mut handle = container.generate_task(prompt.clone(), greedy(200), Some(ticket));
    let texts = handle
        .by_ref()
        .filter(|e| matches!(e, Event::Text(_)))
        .take(3)
        .count();
    assert_eq!(texts, 3);
    handle.cancel();
    let g = handle.join().expect("joined");
    assert_eq!(g.info.stop, StopReason::Cancelled);
    assert!(g.tokens.len() < 20, "{} tokens", g.tokens.len());
    assert!(
        manager.running().is_empty(),
        "the ticket ended with the task"
    );
    assert_eq!(*seen.lock().unwrap(), vec![1024, 1000]);
    // Dropping a handle mid-stream cancels and joins too: the container is
    // free at once for the next request.
    let mut second = container.generate_task(prompt.clone(), greedy(200), None);
    assert!(second.next().is_some());
    drop(second);
    let next = container
        .generate(&prompt, &greedy(4), &mut |_| {})
        .expect("the next request runs");
    assert_eq!(next.info.stop, StopReason::Length);
    assert_eq!(next.tokens.len(), 4);
}

#[test]
fn a_saved_chat_session_continues_like_the_live_one() {
    let lm = smollm2();
    let _g = mlx_lock();
    let file =
        std::env::temp_dir().join(format!("lmspec-session-{}.safetensors", std::process::id()));
    lm.perform(|lm| {
        let mut live = ChatSession::new(lm, Some("Answer briefly."), greedy(12));
        live.respond("Name a color.").expect("turn 1");
        live.save_cache(&file).expect("save");
        let status = live.cache_status();
        let mut restored = ChatSession::restore(lm, &file, greedy(12)).expect("restore");
        assert_eq!(restored.cache_status(), status);
        assert_eq!(restored.history(), live.history());
        assert_eq!(restored.instructions.as_deref(), Some("Answer briefly."));
        let a = live.respond("And another one?").expect("live turn 2");
        let b = restored
            .respond("And another one?")
            .expect("restored turn 2");
        assert_eq!(a, b);
        assert_eq!(restored.last_fed_tokens, live.last_fed_tokens);
        // A session that only knows the history feeds it all once.
        let history = live.history()[..2].to_vec();
        let mut rehydrated =
            ChatSession::with_history(lm, Some("Answer briefly."), greedy(12), history);
        assert_eq!(rehydrated.cache_status().cached_tokens, 0);
        let c = rehydrated
            .respond("And another one?")
            .expect("rehydrated turn 2");
        assert_eq!(c, a);
        assert!(rehydrated.last_fed_tokens > live.last_fed_tokens);
    });
    let _ = std::fs::remove_file(&file);
}

#[test]
fn xtc_removes_what_mlx_lm_removes() {
    let logits: Vec<f32> = vec![2.0, 1.9, 1.5, 0.3, -1.0, 1.95, -3.0, 0.0];
    let special = [1u32];
    let script = format!(
        "import json, mlx.core as mx\n\
         from mlx_lm.sample_utils import apply_xtc\n\
         x = mx.array({logits:?})\n\
         y = apply_xtc(x, 1.0, 0.1, [1])\n\
         print(json.dumps([0.0 if v == float('-inf') else 1.0 for v in y.tolist()]))"
    );
    let out = Command::new(root().join(".venv/bin/python"))
        .args(["-c", &script])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept = json_floats(&serde_json::from_slice(&out.stdout).expect("json"));
    let mut ours = logits.clone();
    apply_xtc(&mut ours, 0.1, &special);
    let ours_kept: Vec<f32> = ours
        .iter()
        .map(|v| if v.is_finite() { 1.0 } else { 0.0 })
        .collect();
    assert_eq!(ours_kept, kept);
    assert!(ours_kept.contains(&0.0), "something was removed");
}

#[test]
fn measuring_a_prompt_reports_weights_cache_and_workspace() {
    let _g = mlx_lock();
    let m = golden("llama");
    let short = lmspec::engine::memory::measure(&m, 16, 8, Default::default()).expect("measure");
    // Past the first 256-position block the cache grows.
    let long = lmspec::engine::memory::measure(&m, 300, 64, Default::default()).expect("measure");
    assert!(
        short.kv_bytes > 0 && long.kv_bytes > short.kv_bytes,
        "{short:?} {long:?}"
    );
    assert!(short.weight_bytes > 0);
    assert_eq!(
        short.total_bytes,
        short.weight_bytes + short.kv_bytes + short.workspace_bytes
    );
    assert!(short.peak_active_bytes >= short.kv_bytes);
    assert_eq!((long.token_count, long.prefill_step_size), (300, 64));
    let err = lmspec::engine::memory::measure(&m, 0, 8, Default::default()).expect_err("refused");
    assert!(err.to_string().contains("token_count"), "{err}");
}
