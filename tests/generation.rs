//! Generation with the default model and the tiny goldens: chat sessions,
//! the shared container, detokenization, and bad input.
use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use lmspec::engine::Error;
use lmspec::lm::generate::{Event, GenerateParams, StopReason};
use lmspec::lm::tokenizer::StreamingDetokenizer;
use lmspec::lm::{ChatSession, ModelContainer};

use crate::support::{goldens, library, mlx_lock};

pub fn default_model() -> PathBuf {
    lmspec::default_model()
        .filter(|p| p.exists())
        .expect("the default model is installed by the setup")
}

/// The default model, loaded once for the tests of this binary.
pub fn smollm2() -> &'static ModelContainer {
    static LM: OnceLock<ModelContainer> = OnceLock::new();
    LM.get_or_init(|| {
        let _guard = mlx_lock();
        ModelContainer::new(
            crate::support::load_lm(&default_model(), &library(), None).expect("SmolLM2 loads"),
        )
    })
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn chat_session_reuses_the_cache_across_turns() {
    let lm = smollm2();
    let _guard = mlx_lock();
    lm.perform(|lm| {
        let mut s = ChatSession::new(lm, None, greedy(24));
        let first = s.respond("What is the capital of France?").expect("turn 1");
        assert!(first.contains("Paris"), "{first}");
        let turn1_fed = s.last_fed_tokens;
        let second = s.respond("And of Italy?").expect("turn 2");
        assert!(!second.is_empty());
        let history = lm
            .chat_prompt(
                &serde_json::json!([
                    {"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": "And of Italy?"}
                ]),
                &s.context,
            )
            .expect("render");
        assert!(
            s.last_fed_tokens < history.len() / 2,
            "turn 2 fed {} of {} history tokens (turn 1 fed {turn1_fed})",
            s.last_fed_tokens,
            history.len()
        );
        assert_eq!(s.history().len(), 4);
        s.clear();
        assert!(s.history().is_empty());
    });
}

#[test]
fn container_is_shared_across_threads_and_cancels() {
    let lm = smollm2().clone();
    let _guard = mlx_lock();
    let canceller = lm.clone();
    let handle = std::thread::spawn(move || {
        let prompt = lm
            .perform(|m| m.tokenizer.encode("Once upon a time"))
            .expect("encode");
        let mut texts = 0;
        let out = lm
            .generate(&prompt, &greedy(200), &mut |e| {
                if let Event::Text(_) = e {
                    texts += 1;
                    if texts == 3 {
                        canceller.cancel();
                    }
                }
            })
            .expect("generate");
        (out.info.stop, out.tokens.len())
    });
    let (stop, n) = handle.join().expect("thread");
    assert_eq!(stop, StopReason::Cancelled);
    assert!(n < 20, "{n} tokens before the cancel took effect");
}

#[test]
fn streaming_detokenizer_handles_multibyte_text() {
    let lm = smollm2();
    lm.perform(|lm| {
        let text = "Grüße aus Köln 🌍! 東京は晴れ — naïve café";
        let ids = lm.tokenizer.encode(text).expect("encode");
        let mut d = StreamingDetokenizer::new();
        let mut out = String::new();
        for id in &ids {
            let piece = d.push(&lm.tokenizer, *id).expect("push");
            assert!(
                !piece.contains('\u{FFFD}'),
                "partial character emitted: {piece:?}"
            );
            out.push_str(&piece);
        }
        out.push_str(&d.finish(&lm.tokenizer).expect("finish"));
        assert_eq!(out, text);
        assert_eq!(lm.tokenizer.decode(&ids, false).expect("decode"), text);
    });
}

#[test]
fn stop_strings_end_generation_and_are_not_emitted() {
    let lm = smollm2();
    let _guard = mlx_lock();
    lm.perform(|lm| {
        let prompt = lm
            .chat_prompt(
                &serde_json::json!([{"role": "user", "content": "What is the capital of France?"}]),
                &lmspec::lm::template::ChatContext {
                    add_generation_prompt: true,
                    ..Default::default()
                },
            )
            .expect("prompt");
        let params = GenerateParams {
            stop_strings: vec!["Paris".into()],
            ..greedy(40)
        };
        let out = lm
            .generate(&prompt, &params, None, None, &mut |_| {})
            .expect("generate");
        assert_eq!(out.info.stop, StopReason::Stop);
        assert!(
            !out.text.contains("Paris") && out.text.contains("capital"),
            "{}",
            out.text
        );
    });
}

fn temp_model_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in fs::read_dir(goldens().join("llama/model")).expect("golden model") {
        let p = entry.expect("entry").path();
        fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
    }
    for (name, text) in files {
        fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

#[test]
fn missing_or_broken_tokenizer_is_a_clear_error() {
    let _guard = mlx_lock();
    let dir = temp_model_dir(&[]);
    match crate::support::load_lm(dir.path(), &library(), None).expect_err("no tokenizer") {
        Error::Tokenizer { file, msg } => {
            assert!(file.ends_with("tokenizer.json"), "{file:?}");
            assert!(msg.contains("missing"), "{msg}");
        }
        other => panic!("{other}"),
    }
    let dir = temp_model_dir(&[("tokenizer.json", "{\"version\": \"1.0\", \"model\": 42}")]);
    let err = crate::support::load_lm(dir.path(), &library(), None).expect_err("broken");
    assert!(matches!(err, Error::Tokenizer { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("tokenizer.json: tokenizer: cannot load"),
        "{err}"
    );
}

#[test]
fn template_errors_name_the_template_source() {
    let _guard = mlx_lock();
    let tok = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"a":0,"b":1,"[UNK]":2},"unk_token":"[UNK]"}}"#;
    let dir = temp_model_dir(&[
        ("tokenizer.json", tok),
        (
            "tokenizer_config.json",
            r#"{"chat_template": "{% for m in messages %}{{ m.content }"}"#,
        ),
    ]);
    let err = crate::support::load_lm(dir.path(), &library(), None).expect_err("bad template");
    assert!(matches!(err, Error::Template { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("tokenizer_config.json: chat template:"),
        "{err}"
    );

    let dir = temp_model_dir(&[
        ("tokenizer.json", tok),
        (
            "tokenizer_config.json",
            r#"{"chat_template": "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('tool messages are not supported') }}{% endif %}{{ m.content }}{% endfor %}"}"#,
        ),
    ]);
    let lm = crate::support::load_lm(dir.path(), &library(), None).expect("loads");
    let msgs = serde_json::json!([{"role": "tool", "content": "a"}]);
    let err = lm.render(&msgs, &Default::default()).expect_err("raises");
    assert!(
        err.to_string().contains("tool messages are not supported"),
        "{err}"
    );
    assert_eq!(
        lm.render(
            &serde_json::json!([{"role": "user", "content": "a b"}]),
            &Default::default()
        )
        .expect("renders"),
        "a b"
    );
}

/// Writes a minimal GGUF v3 file with one tensor of type `ggml_type`.
fn write_gguf(path: &std::path::Path, ggml_type: u32, dims: &[u64], data_len: usize) {
    let mut b: Vec<u8> = Vec::new();
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "blk.0.attn_q.weight");
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(ggml_type.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; data_len]);
    fs::write(path, b).expect("write gguf");
}

#[test]
fn unknown_gguf_tensor_type_is_a_clear_error() {
    let _guard = mlx_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("odd.gguf");
    // Type 16 is IQ2_XXS (256-value blocks of 66 bytes), which our GGUF
    // reader does not read.
    write_gguf(&file, 16, &[256], 66);
    let err = crate::support::load_model(&file, &library(), None).expect_err("unsupported type");
    match &err {
        Error::Weights { file: f, msg } => {
            assert_eq!(f, &file);
            assert!(
                msg.contains(
                    "tensor 'blk.0.attn_q.weight': type: IQ2_XXS (ggml type 16) is not supported"
                ),
                "{msg}"
            );
        }
        other => panic!("{other}"),
    }
    let garbage = dir.path().join("garbage.gguf");
    fs::write(&garbage, b"not a gguf file at all").expect("write");
    let err = crate::support::load_model(&garbage, &library(), None).expect_err("garbage");
    assert!(
        matches!(err, Error::Weights { .. }) && err.to_string().contains("garbage.gguf"),
        "{err}"
    );
}
