//! Bad sentence-transformers files and embed/rerank arguments: each is an
//! error naming the file and the field (never a panic), on a copy of the
//! tiny EmbeddingGemma golden (modules: Transformer, Pooling, two Dense,
//! Normalize); and the `embed` / `rerank` commands end to end.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use lmspec::engine::Error;
use lmspec::lm::{Embedder, Reranker};

use crate::support::{goldens, library, mlx_lock};

fn golden_model(case: &str) -> PathBuf {
    goldens().join("embeddings").join(case).join("model")
}

/// A writable copy of a golden's model folder.
fn copy_of(case: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&golden_model(case), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for entry in fs::read_dir(from).expect("read_dir") {
        let p = entry.expect("entry").path();
        let dest = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            fs::copy(&p, &dest).expect("copy");
        }
    }
}

fn load(dir: &Path) -> Result<Embedder, Error> {
    let _guard = mlx_lock();
    Embedder::load(dir, &crate::support::opts(&library(), None))
}

/// The config error of loading `dir`: (file, key, message).
fn config_error(dir: &Path) -> (PathBuf, String, String) {
    match load(dir).expect_err("bad files") {
        Error::Config { file, key, msg } => (file, key, msg),
        other => panic!("expected a config error, got: {other}"),
    }
}

fn edit(path: &Path, f: impl Fn(serde_json::Value) -> serde_json::Value) {
    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).expect("read")).expect("JSON");
    fs::write(path, serde_json::to_string_pretty(&f(v)).expect("JSON")).expect("write");
}

#[test]
fn malformed_modules_json_is_named() {
    let d = copy_of("gemma3_embedding");
    let modules = d.path().join("modules.json");
    fs::write(&modules, "[{\"type\": ").expect("write");
    let (file, key, msg) = config_error(d.path());
    assert!(file.ends_with("modules.json"), "{file:?}");
    assert_eq!(key, "<document>");
    assert!(msg.contains("invalid JSON"), "{msg}");

    fs::write(&modules, "{\"type\": 1}").expect("write");
    let (_, key, msg) = config_error(d.path());
    assert_eq!(key, "<document>");
    assert!(msg.contains("not a JSON list"), "{msg}");

    let fresh = || {
        copy_dir(&golden_model("gemma3_embedding"), d.path());
    };
    fresh();
    edit(&modules, |mut v| {
        v[1].as_object_mut().expect("module").remove("type");
        v
    });
    let (_, key, _) = config_error(d.path());
    assert_eq!(key, "[1].type");

    fresh();
    edit(&modules, |mut v| {
        v[2]["type"] = "sentence_transformers.models.LSTM".into();
        v
    });
    let (_, key, msg) = config_error(d.path());
    assert_eq!(key, "[2].type");
    assert!(
        msg.contains("LSTM") && msg.contains("not supported"),
        "{msg}"
    );

    fresh();
    edit(&modules, |mut v| {
        v[1]["path"] = "../../etc".into();
        v
    });
    let (_, key, msg) = config_error(d.path());
    assert_eq!(key, "[1].path");
    assert!(msg.contains("not a folder inside"), "{msg}");
}

#[test]
fn bad_pooling_configs_are_named() {
    let d = copy_of("gemma3_embedding");
    let pooling = d.path().join("1_Pooling/config.json");
    edit(&pooling, |mut v| {
        v["pooling_mode_median_tokens"] = true.into();
        v
    });
    let (file, key, msg) = config_error(d.path());
    assert!(file.ends_with("1_Pooling/config.json"), "{file:?}");
    assert_eq!(key, "pooling_mode_median_tokens");
    assert!(msg.contains("unknown pooling mode"), "{msg}");

    fs::write(&pooling, r#"{"pooling_mode": "median"}"#).expect("write");
    let (_, key, msg) = config_error(d.path());
    assert_eq!(key, "pooling_mode");
    assert!(msg.contains("unknown mode 'median'"), "{msg}");

    fs::write(&pooling, r#"{"pooling_mode_mean_tokens": "yes"}"#).expect("write");
    let (_, key, _) = config_error(d.path());
    assert_eq!(key, "pooling_mode_mean_tokens");

    fs::write(&pooling, r#"{"pooling_mode_mean_tokens": false}"#).expect("write");
    let (_, _, msg) = config_error(d.path());
    assert!(msg.contains("no pooling mode"), "{msg}");

    fs::write(
        &pooling,
        r#"{"word_embedding_dimension": 64, "pooling_mode_mean_tokens": true}"#,
    )
    .expect("write");
    let (_, key, msg) = config_error(d.path());
    assert_eq!(key, "word_embedding_dimension");
    assert!(msg.contains("hidden size is 32"), "{msg}");

    fs::remove_file(&pooling).expect("rm");
    let (file, _, msg) = config_error(d.path());
    assert!(
        file.ends_with("1_Pooling/config.json") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn bad_dense_layers_are_named() {
    let d = copy_of("gemma3_embedding");
    let config = d.path().join("3_Dense/config.json");
    edit(&config, |mut v| {
        v["in_features"] = 100.into();
        v
    });
    match load(d.path()).expect_err("wrong shape") {
        Error::Weights { file, msg } => {
            assert!(file.ends_with("3_Dense/model.safetensors"), "{file:?}");
            assert!(
                msg.contains("linear.weight") && msg.contains("[32, 100]"),
                "{msg}"
            );
        }
        other => panic!("{other}"),
    }

    // The first layer's output and the second's input disagree.
    copy_dir(&golden_model("gemma3_embedding"), d.path());
    edit(&d.path().join("2_Dense/config.json"), |mut v| {
        v["out_features"] = 64.into();
        v
    });
    match load(d.path()).expect_err("wrong shape") {
        Error::Weights { file, msg } => {
            assert!(file.ends_with("2_Dense/model.safetensors"), "{file:?}");
            assert!(msg.contains("[64, 32]"), "{msg}");
        }
        other => panic!("{other}"),
    }

    copy_dir(&golden_model("gemma3_embedding"), d.path());
    edit(&config, |mut v| {
        v["activation_function"] = "torch.nn.modules.activation.GELU".into();
        v
    });
    let (file, key, _) = config_error(d.path());
    assert!(file.ends_with("3_Dense/config.json"), "{file:?}");
    assert_eq!(key, "activation_function");

    copy_dir(&golden_model("gemma3_embedding"), d.path());
    edit(&config, |mut v| {
        v.as_object_mut().expect("config").remove("out_features");
        v
    });
    let (_, key, msg) = config_error(d.path());
    assert_eq!((key.as_str(), msg.as_str()), ("out_features", "missing"));

    copy_dir(&golden_model("gemma3_embedding"), d.path());
    edit(&config, |mut v| {
        v["bias"] = true.into();
        v
    });
    match load(d.path()).expect_err("no bias") {
        Error::Weights { msg, .. } => assert!(msg.contains("linear.bias"), "{msg}"),
        other => panic!("{other}"),
    }

    copy_dir(&golden_model("gemma3_embedding"), d.path());
    fs::remove_file(d.path().join("3_Dense/model.safetensors")).expect("rm");
    match load(d.path()).expect_err("no weights") {
        Error::Weights { file, msg } => {
            assert!(file.ends_with("3_Dense/model.safetensors"), "{file:?}");
            assert!(msg.contains("missing"), "{msg}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn bad_prompts_and_lengths_are_named() {
    let d = copy_of("qwen3_embedding");
    let st = d.path().join("config_sentence_transformers.json");
    edit(&st, |mut v| {
        v["default_prompt_name"] = "passage".into();
        v
    });
    let (file, key, msg) = config_error(d.path());
    assert!(
        file.ends_with("config_sentence_transformers.json"),
        "{file:?}"
    );
    assert_eq!(key, "default_prompt_name");
    assert!(msg.contains("'passage'"), "{msg}");

    fs::write(&st, r#"{"prompts": ["query"]}"#).expect("write");
    let (_, key, _) = config_error(d.path());
    assert_eq!(key, "prompts");

    fs::remove_file(&st).expect("rm");
    edit(&d.path().join("sentence_bert_config.json"), |mut v| {
        v["max_seq_length"] = (-1).into();
        v
    });
    let (file, key, _) = config_error(d.path());
    assert!(file.ends_with("sentence_bert_config.json"), "{file:?}");
    assert_eq!(key, "max_seq_length");

    // Pooling without the prompt's tokens is refused with a prompt.
    let g = copy_of("gemma3_embedding");
    edit(&g.path().join("1_Pooling/config.json"), |mut v| {
        v["include_prompt"] = false.into();
        v
    });
    fs::write(
        g.path().join("config_sentence_transformers.json"),
        r#"{"prompts": {"query": "task: search result | query: "}}"#,
    )
    .expect("write");
    let mut e = load(g.path()).expect("loads without a prompt");
    match e.use_prompt("query").expect_err("include_prompt") {
        Error::Config { file, key, .. } => {
            assert!(file.ends_with("1_Pooling/config.json"), "{file:?}");
            assert_eq!(key, "include_prompt");
        }
        other => panic!("{other}"),
    }

    let mut e = load(&golden_model("qwen3_embedding")).expect("loads");
    match e.use_prompt("passage").expect_err("unknown prompt") {
        Error::Config { key, msg, .. } => {
            assert_eq!(key, "prompts");
            assert!(
                msg.contains("no prompt named 'passage' (known: query, document)"),
                "{msg}"
            );
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_reranker_needs_one_score_per_pair() {
    let d = copy_of("reranker");
    edit(&d.path().join("config.json"), |mut v| {
        v["id2label"] = serde_json::json!({"0": "a", "1": "b"});
        v
    });
    let _guard = mlx_lock();
    let err =
        Reranker::load(d.path(), &crate::support::opts(&library(), None)).expect_err("two labels");
    // The checkpoint's out_proj has one row: the spec's 2 labels do not fit.
    assert!(err.to_string().contains("classifier.out_proj"), "{err}");
}

fn lmspec(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args(args)
        .env("LMSPEC_SPECS", crate::support::root().join("specs"))
        .output()
        .expect("run lmspec")
}

#[test]
fn embed_command_reads_a_file_and_writes_npy_and_jsonl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = golden_model("gemma3_embedding");
    let model = model.to_str().expect("path");
    let lines = dir.path().join("lines.txt");
    fs::write(
        &lines,
        "Hello!\nThe quick brown fox jumps over the lazy dog.\nsearch\n",
    )
    .expect("write");
    let npy = dir.path().join("v.npy");
    let out = lmspec(&[
        "embed",
        "--model",
        model,
        "--file",
        lines.to_str().expect("p"),
        "--out",
        npy.to_str().expect("p"),
        "--dimensions",
        "16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = fs::read(&npy).expect("npy");
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("header");
    assert!(header.contains("'shape': (3, 16)"), "{header}");
    assert_eq!((10 + header_len) % 64, 0);
    assert_eq!(bytes.len(), 10 + header_len + 3 * 16 * 4);

    let jsonl = dir.path().join("v.jsonl");
    let out = lmspec(&[
        "embed",
        "--model",
        model,
        "--file",
        lines.to_str().expect("p"),
        "--out",
        jsonl.to_str().expect("p"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(&jsonl).expect("jsonl");
    let rows: Vec<Vec<f32>> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("row"))
        .collect();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.len() == 32));
    // The npy rows are the jsonl rows' first 16 dimensions, renormalised.
    let first: Vec<f32> = bytes[10 + header_len..10 + header_len + 64]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(lmspec::lm::embed::cosine(&first, &rows[0][..16]) > 0.999_999);
}

#[test]
fn embed_and_rerank_commands_refuse_bad_arguments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = golden_model("gemma3_embedding");
    let model = model.to_str().expect("path");
    let empty = dir.path().join("empty.txt");
    fs::write(&empty, "").expect("write");
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "embed",
                "--model",
                model,
                "--file",
                empty.to_str().expect("p"),
            ],
            "empty.txt: no lines",
        ),
        (
            &["embed", "--model", model, "--dimensions", "33", "hi"],
            "--dimensions 33: the model gives 32-dimensional vectors",
        ),
        (
            &["embed", "--model", model, "--out", "v.csv", "hi"],
            "must end in .npy or .jsonl",
        ),
        (
            &["embed", "--model", model, "--pooling", "median", "hi"],
            "--pooling: 'median'",
        ),
    ];
    for (args, want) in cases {
        let out = lmspec(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = lmspec(&["rerank", "--model", model, "--query", "q"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no documents"));
}

#[test]
fn rerank_command_prints_the_best_first() {
    let model = golden_model("reranker");
    let reference =
        crate::support::read_json(&model.parent().expect("case").join("reference.json"));
    let mut args = vec![
        "rerank".to_string(),
        "--model".into(),
        model.to_str().expect("path").into(),
        "--query".into(),
        reference["query"].as_str().expect("query").into(),
        "--top-k".into(),
        "3".into(),
    ];
    for d in reference["documents"].as_array().expect("docs") {
        args.push(d.as_str().expect("doc").into());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lmspec(&refs);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("line");
            v["index"].as_u64().expect("index")
        })
        .collect();
    let want: Vec<u64> = reference["order"].as_array().expect("order")[..3]
        .iter()
        .map(|k| k.as_u64().expect("k"))
        .collect();
    assert_eq!(got, want);
}
