//! Generation against mlx-lm references: cache variants on the tiny
//! goldens, the real SmolLM2 model, and chat-template rendering.
use std::fs;

use lmspec::engine::cache::CacheOptions;
use lmspec::engine::Model;
use lmspec::lm::generate::{GenerateParams, TokenGenerator};
use lmspec::lm::template::{ChatContext, ChatTemplate};
use serde_json::Value;

use crate::generation::smollm2;
use crate::support::{goldens, library, mlx_lock, root};

fn json(path: &std::path::Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).expect("fixture")).expect("json")
}

fn ints(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_u64().expect("int") as u32)
        .collect()
}

fn opt_i32(v: &Value) -> Option<i32> {
    v.as_i64().map(|x| x as i32)
}

/// `max_tokens` tokens from the token loop, not stopping at EOS.
fn tokens(model: &Model, prompt: &[u32], params: &GenerateParams) -> Vec<u32> {
    let mut cache = model.new_cache_with(params.cache);
    let mut g =
        TokenGenerator::new(model, &mut cache, prompt, params, &mut |_, _| {}).expect("prefill");
    let mut out = Vec::new();
    while let Some(t) = g.next_token() {
        out.push(t.expect("token"));
    }
    out
}

#[test]
fn tiny_greedy_matches_mlx_lm_with_every_cache() {
    let _guard = mlx_lock();
    let cases = json(&goldens().join("generation/cases.json"));
    let mut failures = Vec::new();
    for case in cases.as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let model = crate::support::load_model(
            &root().join(case["model"].as_str().expect("model")),
            &library(),
            None,
        )
        .expect("model");
        let p = &case["params"];
        let params = GenerateParams {
            max_tokens: 32,
            prefill_step_size: p["prefill_step_size"].as_u64().expect("step") as usize,
            cache: CacheOptions {
                max_kv_size: opt_i32(&p["max_kv_size"]),
            },
            kv_bits: opt_i32(&p["kv_bits"]),
            kv_group_size: opt_i32(&p["kv_group_size"]).expect("group"),
            quantized_kv_start: opt_i32(&p["quantized_kv_start"]).expect("start"),
            ..Default::default()
        };
        let got = tokens(&model, &ints(&case["prompt"]), &params);
        let want = ints(&case["greedy"]);
        eprintln!(
            "{name:<18} {}",
            if got == want { "identical" } else { "DIFFERS" }
        );
        if got != want {
            failures.push(format!("{name}: got {got:?}\n want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn smollm2_greedy_matches_mlx_lm_on_real_weights() {
    let reference = json(&goldens().join("smollm2_chat/reference.json"));
    let lm = smollm2();
    let _guard = mlx_lock();
    lm.perform(|lm| {
        let ctx = ChatContext {
            add_generation_prompt: true,
            ..Default::default()
        };
        for p in reference["prompts"].as_array().expect("prompts") {
            let messages = serde_json::json!([{"role": "user", "content": p["user"]}]);
            let rendered = lm.render(&messages, &ctx).expect("render");
            assert_eq!(rendered, p["rendered"].as_str().expect("rendered"));
            let ids = lm.chat_prompt(&messages, &ctx).expect("encode");
            assert_eq!(ids, ints(&p["prompt_ids"]), "prompt ids for {}", p["user"]);
            let want = ints(&p["greedy"]);
            let params = GenerateParams {
                max_tokens: want.len(),
                ..Default::default()
            };
            let got = tokens(&lm.model, &ids, &params);
            assert_eq!(got, want, "greedy continuation of {}", p["user"]);
        }
        let france = lm
            .generate(
                &ints(&reference["prompts"][0]["prompt_ids"]),
                &GenerateParams {
                    max_tokens: 64,
                    ..Default::default()
                },
                None,
                None,
                &mut |_| {},
            )
            .expect("generate");
        assert!(france.text.contains("Paris"), "{}", france.text);
        assert_eq!(
            france.text,
            reference["prompts"][0]["text_to_eos"]
                .as_str()
                .expect("text")
        );
    });
}

#[test]
fn chat_templates_render_like_python() {
    let dir = goldens().join("templates");
    let cases = json(&dir.join("cases.json"));
    for case in cases.as_array().expect("cases") {
        let name = case["name"].as_str().unwrap_or("?");
        let file = dir.join(case["template"].as_str().expect("template"));
        let t = ChatTemplate::new(&fs::read_to_string(&file).expect("template"), &file)
            .expect("parses");
        let ctx = ChatContext {
            tools: (!case["tools"].is_null()).then(|| case["tools"].clone()),
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(false),
            bos_token: case["bos_token"].as_str().map(str::to_string),
            eos_token: case["eos_token"].as_str().map(str::to_string),
            extra: case["extra"].as_object().cloned().unwrap_or_default(),
        };
        let out = t.render(&case["messages"], &ctx);
        match (case.get("expected"), case.get("expected_error")) {
            (Some(Value::String(want)), _) => {
                assert_eq!(
                    out.as_deref().map_err(|e| e.to_string()),
                    Ok(want.as_str()),
                    "case {name}"
                )
            }
            (_, Some(Value::String(msg))) => {
                let err = out.expect_err(name).to_string();
                assert!(err.contains(msg.as_str()), "case {name}: {err}");
            }
            _ => panic!("case {name} has no expectation"),
        }
    }
}
