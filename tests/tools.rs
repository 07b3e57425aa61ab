//! Tool-call formats as data: fixtures per format, fed whole and one
//! character at a time; arbitrary text and chunking never panic.
use lmspec::engine::tools::{
    merge_text, RejectReason, ToolCall, ToolEvent, ToolFormat, ToolParser,
};
use serde_json::Value;

use crate::support::root;

fn formats() -> Vec<ToolFormat> {
    ToolFormat::load_dir(&root().join("specs/tool-formats")).expect("tool formats load")
}

fn expected(events: &[serde_yaml::Value]) -> Vec<ToolEvent> {
    events
        .iter()
        .map(|e| {
            let e: Value = serde_json::to_value(e).expect("json");
            if let Some(t) = e.get("text") {
                ToolEvent::Text(t.as_str().expect("text").to_string())
            } else if let Some(c) = e.get("call") {
                ToolEvent::Call(ToolCall {
                    name: c["name"].as_str().expect("name").to_string(),
                    arguments: c["arguments"].clone(),
                    id: c.get("id").and_then(|i| i.as_str()).map(str::to_string),
                })
            } else {
                let reason = match e["rejected"].as_str().expect("reason") {
                    "malformed" => RejectReason::Malformed,
                    "incomplete" => RejectReason::Incomplete,
                    "undeclared" => RejectReason::UndeclaredTool,
                    "invalid" => RejectReason::InvalidArguments,
                    r => panic!("unknown reason {r}"),
                };
                ToolEvent::Rejected {
                    reason,
                    text: String::new(),
                    detail: String::new(),
                }
            }
        })
        .collect()
}

/// Rejections compare by reason only.
fn normalise(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    merge_text(events)
        .into_iter()
        .map(|e| match e {
            ToolEvent::Rejected { reason, .. } => ToolEvent::Rejected {
                reason,
                text: String::new(),
                detail: String::new(),
            },
            e => e,
        })
        .collect()
}

fn run(format: &ToolFormat, tools: &[String], chunks: &[&str]) -> Vec<ToolEvent> {
    run_with(format, tools, &[], chunks)
}

fn run_with(
    format: &ToolFormat,
    tools: &[String],
    schemas: &[(String, Value)],
    chunks: &[&str],
) -> Vec<ToolEvent> {
    let mut p = ToolParser::new(format, tools);
    if !schemas.is_empty() {
        p = p.with_schemas(schemas);
    }
    let mut out = Vec::new();
    for c in chunks {
        out.extend(p.push(c));
    }
    out.extend(p.finish());
    out
}

#[test]
fn fixtures_parse_the_same_whole_and_char_by_char() {
    let formats = formats();
    let cases: Vec<serde_yaml::Value> = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tool_calls.yaml")).expect("fixtures"),
    )
    .expect("yaml");
    let mut seen = std::collections::BTreeSet::new();
    for case in &cases {
        let fname = case["format"].as_str().expect("format");
        let name = case["name"].as_str().expect("name");
        let format = formats
            .iter()
            .find(|f| f.name == fname)
            .unwrap_or_else(|| panic!("no format {fname}"));
        seen.insert(fname.to_string());
        let tools: Vec<String> = case
            .get("tools")
            .and_then(|t| t.as_sequence())
            .map(|s| {
                s.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let schemas: Vec<(String, Value)> = case
            .get("schemas")
            .and_then(|s| s.as_mapping())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().expect("tool name").to_string(),
                            serde_json::to_value(v).expect("schema"),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let text = case["text"].as_str().expect("text");
        let want = expected(case["events"].as_sequence().expect("events"));
        let whole = normalise(run_with(format, &tools, &schemas, &[text]));
        assert_eq!(whole, want, "{fname}/{name} fed whole");
        let chars: Vec<String> = text.chars().map(|c| c.to_string()).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(
            normalise(run_with(format, &tools, &schemas, &refs)),
            want,
            "{fname}/{name} fed by character"
        );
    }
    let all: std::collections::BTreeSet<String> = formats.iter().map(|f| f.name.clone()).collect();
    assert_eq!(seen, all, "every format has fixtures");
}

#[test]
fn arbitrary_text_and_chunking_never_panic_and_plain_text_passes_through() {
    let formats = formats();
    let mut rng = lmspec::engine::sampling::Rng::new(Some(42));
    let pieces = [
        "<",
        ">",
        "|",
        "tool",
        "_call",
        "[",
        "]",
        "{",
        "}",
        "\"",
        "é",
        "🌍",
        " ",
        "\n",
        "call:",
        "<escape>",
        "x",
        "=",
        "TOOL_CALLS",
        "python_tag",
    ];
    for round in 0..400 {
        let format = &formats[round % formats.len()];
        let mut text = String::new();
        for _ in 0..(rng.next_u64() % 40) {
            text.push_str(pieces[(rng.next_u64() % pieces.len() as u64) as usize]);
        }
        if round % 3 == 0 {
            text.push_str(&format.start);
        }
        let mut chunks = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let n = 1 + (rng.next_u64() % 5) as usize;
            chunks.push(
                chars[i..(i + n).min(chars.len())]
                    .iter()
                    .collect::<String>(),
            );
            i += n;
        }
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let events = merge_text(run(format, &[], &refs));
        let has_marker = text.contains(format.start.as_str())
            || format.drop.iter().any(|d| text.contains(d.as_str()));
        if !has_marker {
            let want = if text.is_empty() {
                vec![]
            } else {
                vec![ToolEvent::Text(text.clone())]
            };
            assert_eq!(events, want, "{}: {text:?}", format.name);
        }
    }
}

#[test]
fn formats_are_inferred_from_chat_templates() {
    let formats = formats();
    let pick = |t: &str| ToolFormat::infer(&formats, t).map(|f| f.name.clone());
    assert_eq!(
        pick("{{ '<tool_call>' }}{{ tool_call.name }}").as_deref(),
        Some("json")
    );
    assert_eq!(
        pick("<tool_call>\n<function={{ name }}>").as_deref(),
        Some("xml_function")
    );
    assert_eq!(
        pick("<|tool_calls_section_begin|>").as_deref(),
        Some("kimi_k2")
    );
    assert_eq!(pick("[TOOL_CALLS]").as_deref(), Some("mistral"));
    assert_eq!(pick("no markers here"), None);
}

#[test]
fn a_bad_format_file_names_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        "spec_version: 1\nname: bad\nstart: '<x>'\npayload: telepathy\n",
    )
    .expect("write");
    let err = ToolFormat::load(&f)
        .expect_err("unknown payload")
        .to_string();
    assert!(
        err.contains("bad.yaml: <document>: payload: unknown payload 'telepathy'"),
        "{err}"
    );
}

fn weather_tool(calls: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> lmspec::engine::Tool {
    lmspec::engine::Tool::new(
        "get_weather",
        "Current weather for a city.",
        serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        move |args| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match args["city"].as_str() {
                Some(city) => Ok(serde_json::json!({"city": city, "sky": "sunny"})),
                None => Err("city is required".into()),
            }
        },
    )
}

#[test]
fn the_tool_loop_runs_a_call_through_the_handler_and_back() {
    let formats = formats();
    let json = formats
        .iter()
        .find(|f| f.name == "json")
        .expect("json format");
    let lm = crate::generation::smollm2();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tools = vec![weather_tool(calls.clone())];
    lm.perform(|lm| {
        // A scripted model: the first answer calls the tool, the second uses
        // the result, which must be in the rendered prompt by then.
        let mut round = 0;
        let mut prompts = Vec::new();
        let mut generate = |history: &[lmspec::engine::Message]| {
            let msgs: Vec<Value> = history.iter().map(|m| m.to_json()).collect();
            let ctx = lmspec::engine::template::ChatContext {
                add_generation_prompt: true,
                tools: Some(tools.iter().map(|t| t.spec()).collect()),
                ..Default::default()
            };
            prompts.push(lm.render(&Value::Array(msgs), &ctx)?);
            round += 1;
            Ok(if round == 1 {
                "Checking.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>".to_string()
            } else {
                "It is sunny in Paris.".to_string()
            })
        };
        let mut history = vec![lmspec::engine::Message::new("user", "Weather in Paris?")];
        let mut events = Vec::new();
        let answer = lmspec::engine::run_tool_loop(&mut history, &tools, json, 4, &mut generate, &mut |e| events.push(e))
            .expect("tool loop");
        assert_eq!(answer, "It is sunny in Paris.");
        assert_eq!(prompts.len(), 2);
        assert!(prompts[1].contains("{\"city\":\"Paris\",\"sky\":\"sunny\"}"), "{}", prompts[1]);
        let roles: Vec<&str> = history.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
        assert_eq!(history[1].tool_calls[0].name, "get_weather");
        assert!(events.iter().any(|e| matches!(e, ToolEvent::Call(c) if c.arguments["city"] == "Paris")));
    });
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The same loop on real generation: the session renders the tools into
    // the prompt and ends when an answer has no call.
    let _guard = crate::support::mlx_lock();
    lm.perform(|lm| {
        let params = lmspec::engine::generate::GenerateParams {
            max_tokens: 24,
            ..Default::default()
        };
        let mut s = lmspec::engine::ChatSession::new(lm, None, params);
        let out = s
            .respond_with_tools("Say hello.", &tools, json, 3, &mut |_| {})
            .expect("session loop");
        assert!(!out.is_empty());
        assert_eq!(s.history().first().map(|m| m.role.as_str()), Some("user"));
        assert_eq!(
            s.history().last().map(|m| m.role.as_str()),
            Some("assistant")
        );
    });
}

#[test]
fn format_resolution_order() {
    let formats = formats();
    let pick = |e, t, tpl, d| ToolFormat::resolve(&formats, e, t, tpl, d).map(|f| f.name.as_str());
    let tpl = Some("{{ '[TOOL_CALLS]' }}");
    assert_eq!(
        pick(Some("glm4"), Some("lfm2"), tpl, Some("gemma")),
        Some("glm4")
    );
    assert_eq!(pick(None, Some("lfm2"), tpl, Some("gemma")), Some("lfm2"));
    assert_eq!(pick(None, None, tpl, Some("gemma")), Some("mistral"));
    assert_eq!(
        pick(None, None, Some("plain"), Some("gemma")),
        Some("gemma")
    );
    assert_eq!(pick(None, None, None, None), Some("json"));
}
