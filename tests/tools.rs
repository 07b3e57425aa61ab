//! Tool-call formats as data: fixtures per format, fed whole and one
//! character at a time; arbitrary text and chunking never panic.
use lmspec::lm::tools::{merge_text, RejectReason, ToolCall, ToolEvent, ToolFormat, ToolParser};
use lmspec::spec::library::SpecRoot;
use serde_json::Value;

use crate::support::root;

fn formats() -> Vec<ToolFormat> {
    ToolFormat::load_all(&SpecRoot::Dir(root().join("specs"))).expect("tool formats load")
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
    let mut rng = lmspec::lm::sampling::Rng::new(Some(42));
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

fn weather_tool(calls: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> lmspec::lm::Tool {
    lmspec::lm::Tool::new(
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
        let mut generate = |history: &[lmspec::lm::Message]| {
            let msgs: Vec<Value> = history.iter().map(|m| m.to_json()).collect();
            let ctx = lmspec::lm::template::ChatContext {
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
        let mut history = vec![lmspec::lm::Message::new("user", "Weather in Paris?")];
        let mut events = Vec::new();
        let answer = lmspec::lm::run_tool_loop(&mut history, &tools, json, 4, &mut generate, &mut |e| events.push(e))
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
}

/// Arguments of the typed weather tool: its JSON schema is derived.
#[derive(serde::Deserialize)]
struct WeatherArgs {
    city: String,
    days: Option<u32>,
}

#[derive(serde::Serialize)]
struct Weather {
    city: String,
    sky: String,
    days: u32,
}

/// A logits processor that makes the model say `replies[round]` token by
/// token and then end it with EOS: its position is the number of tokens
/// since the last `<|im_start|>assistant\n` of the history.
fn forced_replies(
    lm: &lmspec::lm::LanguageModel,
    replies: &[&str],
    round: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> lmspec::lm::sampling::LogitsProcessor {
    let tok = &lm.tokenizer;
    let bos = tok.bos_id;
    let strip_bos = |mut ids: Vec<u32>| {
        if ids.len() > 1 && ids.first() == bos.as_ref() {
            ids.remove(0);
        }
        ids
    };
    let im_start = tok.token_to_id("<|im_start|>").expect("ChatML model");
    let header = tok.encode("<|im_start|>assistant\n").expect("encode");
    let header_len = header.len() - header.iter().position(|&t| t == im_start).expect("header");
    let scripts: Vec<Vec<u32>> = replies
        .iter()
        .map(|r| strip_bos(tok.encode(r).expect("encode")))
        .collect();
    let eos = tok.eos_ids[0];
    lmspec::lm::sampling::LogitsProcessor::new(move |history, logits| {
        let start = history
            .iter()
            .rposition(|&t| t == im_start)
            .map_or(history.len(), |i| i + header_len);
        let pos = history.len().saturating_sub(start);
        let k = round.load(std::sync::atomic::Ordering::SeqCst);
        let next = scripts[k.min(scripts.len() - 1)]
            .get(pos)
            .copied()
            .unwrap_or(eos);
        for (i, x) in logits.iter_mut().enumerate() {
            if i as u32 != next {
                *x = f32::NEG_INFINITY;
            }
        }
    })
}

#[test]
fn a_forced_tool_call_drives_the_chat_session_tool_loop() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let formats = formats();
    let json = formats.iter().find(|f| f.name == "json").expect("json");
    let round = Arc::new(AtomicUsize::new(0));
    let handler_round = round.clone();
    let tool = lmspec::lm::Tool::typed(
        "get_weather",
        "Weather forecast for a city.",
        move |a: WeatherArgs| {
            handler_round.fetch_add(1, Ordering::SeqCst);
            Ok(Weather {
                city: a.city,
                sky: "sunny".into(),
                days: a.days.unwrap_or(1),
            })
        },
    )
    .expect("typed tool");
    assert_eq!(tool.parameters["required"], serde_json::json!(["city"]));
    assert_eq!(tool.parameters["properties"]["days"]["type"], "integer");
    let tools = vec![tool];
    let lm = crate::generation::smollm2();
    let _guard = crate::support::mlx_lock();
    lm.perform(|lm| {
        let call = "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": \"2\"}}</tool_call>";
        let mut params = lmspec::lm::generate::GenerateParams {
            max_tokens: 64,
            ..Default::default()
        };
        params.processors.custom = vec![forced_replies(
            lm,
            &[call, "It is sunny in Paris."],
            round.clone(),
        )];
        let mut s = lmspec::lm::ChatSession::new(lm, None, params);
        let mut events = Vec::new();
        let answer = s
            .respond_with_tools("Weather in Paris?", &tools, json, 3, &mut |e| events.push(e))
            .expect("tool loop");
        assert_eq!(answer, "It is sunny in Paris.");
        assert_eq!(round.load(Ordering::SeqCst), 1, "the handler ran once");
        let roles: Vec<&str> = s.history().iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
        // "2" was typed by the derived schema before the handler saw it.
        assert_eq!(
            s.history()[1].tool_calls[0].arguments,
            serde_json::json!({"city": "Paris", "days": 2})
        );
        assert_eq!(
            s.history()[2].content,
            "{\"city\":\"Paris\",\"sky\":\"sunny\",\"days\":2}"
        );
        assert!(events.iter().any(|e| matches!(e, ToolEvent::Call(_))));
    });
}

#[test]
fn the_generation_stream_reports_reasoning_and_tool_calls() {
    use lmspec::lm::generate::Event;
    let formats = formats();
    let json = formats.iter().find(|f| f.name == "json").expect("json");
    let lm = crate::generation::smollm2();
    let _guard = crate::support::mlx_lock();
    lm.perform(|lm| {
        let reply = "<think>The user wants the weather.</think>Let me check.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call><tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
        let round = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut params = lmspec::lm::generate::GenerateParams {
            max_tokens: 80,
            ..Default::default()
        };
        params.processors.custom = vec![forced_replies(lm, &[reply], round)];
        let schema = serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}});
        params.output = lmspec::lm::tools::OutputFormat::think(Some((
            json,
            vec![("get_weather".to_string(), schema)],
        )));
        let prompt = lm
            .chat_prompt(
                &serde_json::json!([{"role": "user", "content": "Weather in Oslo?"}]),
                &lmspec::lm::template::ChatContext {
                    add_generation_prompt: true,
                    ..Default::default()
                },
            )
            .expect("prompt");
        let mut events = Vec::new();
        let g = lm
            .generate(&prompt, &params, None, None, &mut |e| match e {
                Event::Info(_) | Event::PromptProgress(..) => {}
                e => events.push(e),
            })
            .expect("generate");
        assert_eq!(g.text, reply, "the whole text is kept");
        let mut merged: Vec<Event> = Vec::new();
        for e in events {
            match (merged.last_mut(), e) {
                (Some(Event::Text(a)), Event::Text(b)) => a.push_str(&b),
                (Some(Event::Reasoning(a)), Event::Reasoning(b)) => a.push_str(&b),
                (_, e) => merged.push(e),
            }
        }
        assert_eq!(merged.len(), 4, "{merged:?}");
        assert_eq!(merged[0], Event::Reasoning("The user wants the weather.".into()));
        assert_eq!(merged[1], Event::Text("Let me check.".into()));
        assert!(matches!(&merged[2], Event::ToolCall(c) if c.arguments["city"] == "Oslo"));
        assert!(matches!(
            &merged[3],
            Event::ToolRejected { reason: RejectReason::UndeclaredTool, .. }
        ));
        assert_eq!(g.calls.len(), 1);
    });
}

#[test]
fn format_resolution_order() {
    let formats = formats();
    let pick =
        |e, t, tpl, d| ToolFormat::resolve(&formats, e, None, t, tpl, d).map(|f| f.name.as_str());
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

/// A tokenizer folder whose `tokenizer_config.json` has `response_template`.
fn tokenizer_dir(response_template: Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let embedder = lmspec::default_embedder().expect("the embedder is installed by the setup");
    std::fs::copy(
        embedder.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .expect("copy tokenizer.json");
    let cfg = serde_json::json!({"response_template": response_template});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).expect("write");
    dir
}

#[test]
fn a_checkpoints_response_template_declares_its_format() {
    use lmspec::lm::tokenizer::Tokenizer;
    use lmspec::lm::tools::response::ResponseTemplate;
    let formats = formats();
    let dir = tokenizer_dir(serde_json::json!({
        "defaults": {"role": "assistant"},
        "start_anchor": "<|im_start|>assistant\n",
        "fields": {
            "thinking": {"open": "<think>", "close": "</think>", "content": "text"},
            "tool_calls": {"open": "<tool_call>", "close_pattern": "</tool_call>\\s*",
                "repeats": true, "content": "json",
                "transform": {"type": "function", "function": "{content}"}},
            "content": {"close": "<|im_end|>", "content": "text"}}}));
    let tok = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let (file, t) = tok
        .response_template
        .as_ref()
        .expect("read from tokenizer_config.json");
    let declared = ResponseTemplate::from_json(t, file).expect("a literal template");
    assert_eq!(
        declared.reasoning,
        Some(("<think>".into(), "</think>".into()))
    );
    // The declared format wins over tool_parser_type and the template markers.
    let f = ToolFormat::resolve(
        &formats,
        None,
        declared.tools.as_ref(),
        Some("lfm2"),
        Some("[TOOL_CALLS]"),
        None,
    )
    .expect("a format");
    assert_eq!(f.name, "response_template");
    let text = "Sure.<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}</tool_call>\n";
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
    for chunks in [vec![text], refs] {
        assert_eq!(
            merge_text(run(f, &[], &chunks)),
            vec![
                ToolEvent::Text("Sure.".into()),
                ToolEvent::Call(ToolCall {
                    name: "f".into(),
                    arguments: serde_json::json!({"x": 1}),
                    id: None
                }),
                ToolEvent::Text("\n".into()),
            ]
        );
    }

    // One the reader does not support names the file, field and key.
    let dir = tokenizer_dir(serde_json::json!({"fields": {"tool_calls": {
        "open_pattern": "<\\|channel\\|>commentary to=functions\\.(?P<name>\\w+).*?<\\|message\\|>",
        "close": "<|call|>", "content": "json"}}}));
    let tok = Tokenizer::from_dir(dir.path()).expect("tokenizer");
    let (file, t) = tok.response_template.as_ref().expect("present");
    let err = ResponseTemplate::from_json(t, file)
        .expect_err("regex opener")
        .to_string();
    assert!(
        err.contains(
            "tokenizer_config.json: response_template.fields.tool_calls: open: open_pattern"
        ),
        "{err}"
    );
}

/// One description of how output is read serves `generate`, `chat` and the
/// chat session: reasoning markers, and with tools the resolved format and
/// the tools' schemas; an unknown explicit format is an error.
#[test]
fn the_output_format_resolves_reasoning_tools_and_schemas() {
    let formats = formats();
    let lm = crate::generation::smollm2();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tools = [weather_tool(calls)];
    lm.perform(|lm| {
        let plain = lm
            .output_format(&formats, None, &[], None)
            .expect("no tools");
        assert_eq!(plain.reasoning, Some(("<think>".into(), "</think>".into())));
        assert!(plain.tools.is_none() && plain.schemas.is_empty());
        let json = lm
            .output_format(&formats, None, &tools, Some("json"))
            .expect("json format");
        assert_eq!(json.tools.as_ref().map(|f| f.name.as_str()), Some("json"));
        assert_eq!(json.schemas.len(), 1);
        assert_eq!(json.schemas[0].0, tools[0].name);
        let err = lm
            .output_format(&formats, None, &tools, Some("telepathy"))
            .expect_err("unknown format");
        assert!(
            err.to_string().contains("unknown tool format 'telepathy'"),
            "{err}"
        );
    });
}

#[test]
fn an_openai_tool_spec_becomes_a_tool() {
    let spec = serde_json::json!({"type": "function", "function": {
        "name": "get_weather", "description": "Weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}});
    let tool = lmspec::lm::Tool::from_openai_json(&spec, |_| Ok(Value::Null)).expect("tool");
    assert_eq!(tool.spec(), spec);
    let err = lmspec::lm::Tool::from_openai_json(&serde_json::json!({"function": {}}), |_| {
        Ok(Value::Null)
    })
    .expect_err("no name");
    assert_eq!(err, "function.name: missing");
}

#[test]
fn deeply_nested_arguments_are_malformed_not_a_crash() {
    let formats = formats();
    let fmt = |name: &str| {
        formats
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("format {name}"))
    };
    let deep = 100_000;
    let cases = [
        (
            "lfm2",
            format!(
                "<|tool_call_start|>[f(a={}1{})]<|tool_call_end|>",
                "[".repeat(deep),
                "]".repeat(deep)
            ),
        ),
        (
            "gemma",
            format!(
                "<start_function_call>call:f{{a:{}1{}}}<end_function_call>",
                "[".repeat(deep),
                "]".repeat(deep)
            ),
        ),
    ];
    for (name, text) in cases {
        let events = lmspec::lm::tools::parse_all(fmt(name), &["f".to_string()], &text);
        assert!(
            events.iter().any(|e| matches!(
                e,
                ToolEvent::Rejected {
                    reason: RejectReason::Malformed,
                    ..
                }
            )),
            "{name}: {events:?}"
        );
    }
}
