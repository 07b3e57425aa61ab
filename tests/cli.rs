//! The `lmspec` binary, end to end.
use std::process::{Command, Output};

use lmspec::port::golden::Golden;

use crate::support::{goldens, mlx_lock, root};

fn lmspec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("lmspec runs")
}

fn stdout(args: &[&str]) -> String {
    let out = lmspec(args);
    assert!(
        out.status.success(),
        "lmspec {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn spec_list_and_check_all() {
    insta::assert_snapshot!("spec_list", stdout(&["spec", "list"]));
    let checked = stdout(&["spec", "check", "--all"]);
    let files = std::fs::read_dir(crate::support::root().join("specs/models"))
        .expect("specs/models")
        .count();
    assert!(files >= 19, "{files} spec files");
    assert_eq!(
        checked.lines().filter(|l| l.starts_with("ok ")).count(),
        files,
        "{checked}"
    );
}

#[test]
fn spec_check_fails_on_a_bad_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "spec_version: 1\nextends: llama\nlayers: {count: n_layers, prefix: x, block: nope}\n",
    )
    .expect("write");
    let out = lmspec(&["spec", "check", bad.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("bad.yaml: layers: block: unknown block 'nope'"),
        "{text}"
    );
}

#[test]
fn spec_graph_and_taps() {
    let config = goldens().join("qwen3/model/config.json");
    let config = config.to_str().expect("utf-8");
    let dot = stdout(&["spec", "graph", "qwen3", "--config", config]);
    assert!(dot.starts_with("digraph \"qwen3\""), "{dot}");
    assert!(dot.contains("cluster_layers.1"), "{dot}");
    assert!(
        dot.contains("layers.0.attn.q_norm\\nrms_norm [4x16]"),
        "{dot}"
    );
    insta::assert_snapshot!(
        "qwen3_taps",
        stdout(&["spec", "taps", "qwen3", "--config", config])
    );
    insta::assert_snapshot!("qwen3_graph_dot", dot);
}

#[test]
fn logits_prints_shape_and_the_reference_argmax() {
    let _guard = mlx_lock();
    let case = goldens().join("llama");
    let g = Golden::load(&case).expect("golden");
    let tokens: Vec<String> = g.tokens.iter().map(|t| t.to_string()).collect();
    let model = case.join("model");
    let text = stdout(&[
        "logits",
        "--model",
        model.to_str().expect("utf-8"),
        "--tokens",
        &tokens.join(","),
    ]);
    assert!(
        text.contains(&format!("logits shape: [1, {}, 256]", tokens.len())),
        "{text}"
    );
    let last = g.logits.reshape(&[-1, 256]).expect("reshape");
    let last = mlx_rs::ops::indexing::argmax_axis(&last, -1, None).expect("argmax");
    last.eval().expect("eval");
    let expected = *last.as_slice::<u32>().last().expect("rows");
    let first_row = text
        .lines()
        .skip_while(|l| !l.starts_with("last row"))
        .nth(1)
        .expect("top-5");
    assert_eq!(
        first_row.split_whitespace().next(),
        Some(expected.to_string().as_str()),
        "{text}"
    );
}

#[test]
fn doctor_reports_an_optimised_blas() {
    let _guard = mlx_lock();
    let text = stdout(&["doctor"]);
    assert!(text.contains("MLX:            0.32.2"), "{text}");
    assert!(text.contains("binding test:   ok"), "{text}");
    assert!(text.contains("BLAS:           OpenBLAS"), "{text}");
    assert!(text.contains("GFLOP/s"), "{text}");
}

#[test]
fn errors_exit_nonzero_with_a_message() {
    let out = lmspec(&["logits", "--model", "/nonexistent", "--tokens", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/config.json"), "{err}");
}

#[test]
fn structure_snapshots() {
    let config = goldens().join("llama/model/config.json");
    let config = config.to_str().expect("utf-8");
    insta::assert_snapshot!(
        "llama_ir_dump",
        stdout(&["spec", "dump", "llama", "--config", config])
    );
    insta::assert_snapshot!("help", stdout(&["--help"]));
    insta::assert_snapshot!("port_help", stdout(&["port", "--help"]));
}

#[test]
fn error_text_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("malformed", "spec_version: 1\nconfig:\n  hidden_size: [int\n"),
        ("unknown_op", "spec_version: 1\nextends: llama\nblocks:\n  mlp:\n    inputs: [x]\n    nodes:\n      up: {op: frobnicate, in: x}\n    output: up\n"),
        ("dangling", "spec_version: 1\nextends: llama\nblocks:\n  mlp:\n    inputs: [x]\n    nodes:\n      up: {op: linear, in: y, weight: up_proj, out: hidden_size}\n    output: up\n"),
        ("bad_expr", "spec_version: 1\nextends: llama\nconfig:\n  head_dim: {type: int, default: hidden_size //}\n"),
    ];
    let mut text = String::new();
    for (name, body) in cases {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, body).expect("write");
        let out = lmspec(&["spec", "check", file.to_str().expect("utf-8")]);
        assert!(!out.status.success(), "{name} should fail");
        let shown = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        text.push_str(&shown.replace(&dir.path().display().to_string(), "<tmp>"));
    }
    insta::assert_snapshot!("spec_error_texts", text);
}

/// `lmspec bench --against mlx-lm` on a tiny golden model: both engines
/// report, their repeats pair up, the greedy tokens agree, and the
/// profiles (primitives per step, host time per step, per-op build time)
/// are there and add up.
#[test]
fn bench_against_mlx_lm_pairs_repeats_and_profiles_the_step() {
    let _guard = mlx_lock();
    let model = goldens().join("llama/model");
    let text = stdout(&[
        "bench",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "8",
        "--repeat",
        "2",
        "--against",
        "mlx-lm",
        "--profile-ops",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let (ours, theirs) = (&v["lmspec"], &v["mlx_lm"]);
    assert_eq!(ours["repeat"], 2, "{ours}");
    assert_eq!(theirs["repeat"], 2, "{theirs}");
    assert_eq!(ours["tokens"].as_array().map(Vec::len), Some(8));
    assert_eq!(ours["tokens"], theirs["tokens"], "greedy tokens differ");
    assert_eq!(ours["tokens_equal_every_repeat"], true);
    for side in [ours, theirs] {
        let tps = side["decode_tps"]["median"].as_f64().expect("decode_tps");
        assert!(tps > 0.0, "{side}");
        let graph = &side["decode_graph"];
        let total = graph["total"].as_u64().expect("primitive total");
        let by_kind: u64 = graph["by_kind"]
            .as_object()
            .expect("by_kind")
            .values()
            .filter_map(|n| n.as_u64())
            .sum();
        assert_eq!(total, by_kind, "{graph}");
        assert!(graph["by_kind"]["ArgReduce"].as_u64() == Some(1), "{graph}");
        for part in ["build", "launch", "wait"] {
            assert!(side["decode_step_us"][part].as_f64().is_some(), "{side}");
        }
    }
    let ratio = ours["paired_ratio"]["decode_tps"]["median"]
        .as_f64()
        .expect("paired ratio");
    assert!(ratio > 0.0);
    let ops = ours["build_us_by_op"].as_object().expect("build_us_by_op");
    for op in ["linear", "attention", "rms_norm"] {
        assert!(ops.contains_key(op), "{ops:?}");
    }
}

/// `lmspec bench --against` names what it cannot compare: an unknown
/// engine, llama.cpp without its Python, llama.cpp on a non-GGUF model.
#[test]
fn bench_against_refuses_what_it_cannot_compare() {
    let _guard = mlx_lock();
    let model = goldens().join("llama/model");
    let model = model.to_str().expect("utf-8");
    let run = |against: &str, python: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_lmspec"))
            .args(["bench", "--model", model, "--prompt-tokens", "4"])
            .args(["--gen-tokens", "2", "--repeat", "1", "--against", against])
            .env("LMSPEC_LLAMA_CPP_PYTHON", python)
            .current_dir(root())
            .output()
            .expect("lmspec runs");
        assert!(!out.status.success(), "--against {against} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run("llamacpp", "/nonexistent/python");
    assert!(err.contains("expected `mlx-lm` or `llama.cpp`"), "{err}");
    let err = run("llama.cpp", "/nonexistent/python");
    assert!(
        err.contains("/nonexistent/python") && err.contains("LMSPEC_LLAMA_CPP_PYTHON"),
        "{err}"
    );
    let python = root().join(".venv/bin/python");
    let err = run("llama.cpp", python.to_str().expect("utf-8"));
    assert!(err.contains("needs a .gguf model"), "{err}");
}

/// A reader that stops early closes the pipe: lmspec ends quietly (by
/// SIGPIPE, as other tools do), without a panic message.
#[test]
fn a_closed_pipe_ends_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args(["spec", "list"])
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("lmspec runs");
    // Close the read end before lmspec has written anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("lmspec ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

/// Long local work reports progress on stderr: a prompt of several prefill
/// chunks, one line per chunk when stderr is not a terminal.
#[test]
fn a_prompt_of_several_chunks_reports_its_prefill() {
    let out = lmspec(&[
        "generate",
        "--raw",
        "-p",
        "The sky is blue because of the way the light",
        "--max-tokens",
        "2",
        "--prefill-step-size",
        "3",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for line in ["prefill: 0/", "prefill: 3/", "prefill: 6/"] {
        assert!(err.contains(line), "{line} in {err}");
    }
}

/// `lmspec golden` runs every case it is given: one that cannot run is
/// reported as an error of its own, the others still run.
#[test]
fn golden_reports_a_broken_case_and_runs_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).expect("mkdir");
    std::fs::write(broken.join("meta.json"), "{ not json").expect("write");
    let good = goldens().join("llama");
    let out = lmspec(&[
        "golden",
        broken.to_str().expect("utf-8"),
        good.to_str().expect("utf-8"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("broken") && text.contains("ERROR"), "{text}");
    assert!(text.contains("pass"), "{text}");
    assert!(text.contains("2 cases: 1 pass, 1 fail"), "{text}");
}

/// `cache-prompt` then `generate --prompt-cache`: the new prompt continues
/// the cached message, so the answer equals one for the whole text; a draft
/// model changes nothing in greedy output and reports its acceptance.
#[test]
fn a_cached_prompt_continues_and_a_draft_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("doc.safetensors");
    let file_s = file.display().to_string();
    let doc = "Cats are small carnivorous mammals that people keep as pets.";
    let query = " In three words, what are cats?";
    let out = lmspec(&["cache-prompt", "-p", doc, "--out", &file_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(file.exists());
    let cached = stdout(&[
        "generate",
        "--prompt-cache",
        &file_s,
        "-p",
        query,
        "--max-tokens",
        "12",
    ]);
    let whole = format!("{doc}{query}");
    let plain = stdout(&["generate", "-p", &whole, "--max-tokens", "12"]);
    assert_eq!(cached, plain);
    let out = lmspec(&[
        "generate",
        "-p",
        &whole,
        "--max-tokens",
        "12",
        "--draft-model",
        "smollm2-135m",
        "--draft-weights",
        "quantized",
        "--num-draft-tokens",
        "3",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), plain);
    assert!(err.contains("draft accepted"), "{err}");
    // A file that is not a cache: an error naming it, exit code 1.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"{}").expect("write");
    let junk_s = junk.display().to_string();
    let out = lmspec(&["generate", "--prompt-cache", &junk_s, "-p", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&junk_s) && err.contains("prompt cache"),
        "{err}"
    );
}

/// `port trace` records a golden case's prefill and decode steps node by
/// node, and a second run compared with the recording agrees at every step
/// (same device, same build: bit for bit).
#[test]
fn port_trace_records_and_compares_each_step() {
    let _guard = mlx_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let rec = dir.path().join("trace.safetensors");
    let case = goldens().join("llama");
    let g = Golden::load(&case).expect("golden");
    let (case, rec) = (case.to_str().unwrap(), rec.to_str().unwrap());
    let written = stdout(&["port", "trace", "--golden", case, "--out", rec]);
    assert!(written.contains("values written"), "{written}");
    let table = stdout(&["port", "trace", "--golden", case, "--against", rec]);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(
        rows.len(),
        1 + g.tokens.len() - g.prefill_split(),
        "{table}"
    );
    for (k, row) in rows.iter().enumerate() {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[0], k.to_string(), "{table}");
        assert!(cols[1].parse::<usize>().unwrap() > 10, "{table}");
        assert_eq!(cols[2], "0.00e0", "{table}");
        assert_eq!(cols[3], "none", "{table}");
    }
    let out = lmspec(&["port", "trace", "--golden", case]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--out, --against"), "{err}");
    let out = lmspec(&["port", "trace", "--golden", case, "--out", "trace.bin"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trace.bin: a trace is written as safetensors"),
        "{err}"
    );
    // An encoder's golden has no decode steps to trace.
    let enc = dir.path().join("encoder");
    std::fs::create_dir(&enc).expect("mkdir");
    let src = goldens().join("llama");
    std::fs::copy(
        src.join("golden.safetensors"),
        enc.join("golden.safetensors"),
    )
    .expect("copy");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("meta.json")).expect("meta")).expect("json");
    meta["encoder"] = serde_json::Value::Bool(true);
    meta["model_dir"] = serde_json::Value::String(src.join("model").display().to_string());
    std::fs::write(enc.join("meta.json"), meta.to_string()).expect("write");
    let out = lmspec(&[
        "port",
        "trace",
        "--golden",
        enc.to_str().unwrap(),
        "--out",
        rec,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("an encoder's golden has no cached path"),
        "{err}"
    );
}

/// `LMSPEC_DEVICE` picks MLX's default device; another value is refused.
#[test]
fn device_variable_is_checked() {
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_lmspec"))
            .arg("doctor")
            .env("LMSPEC_DEVICE", value)
            .current_dir(root())
            .output()
            .expect("lmspec runs")
    };
    let out = run("cpu");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("default device: cpu"), "{text}");
    let out = run("tpu");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("LMSPEC_DEVICE=tpu: expected cpu or gpu"),
        "{err}"
    );
}

/// `LMSPEC_GPU_KERNELS` takes `auto`, `on`, `off` or `groups`; another
/// value is refused before the model loads.
#[test]
fn gpu_kernels_variable_is_checked() {
    let _guard = mlx_lock();
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_lmspec"))
            .args([
                "logits",
                "--model",
                "goldens/llama/model",
                "--tokens",
                "1,2",
            ])
            .env("LMSPEC_GPU_KERNELS", value)
            .current_dir(root())
            .output()
            .expect("lmspec runs")
    };
    // On the CPU, `groups` forms the groups and runs their ops.
    let out = run("groups");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("yes");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("LMSPEC_GPU_KERNELS=yes: expected auto, on, off, groups"),
        "{err}"
    );
}

/// `lmspec bench` with a prompt and continuation longer than the model's
/// context says so before it runs.
#[test]
fn bench_refuses_more_positions_than_the_context() {
    let _guard = mlx_lock();
    let model = goldens().join("llama/model");
    let out = lmspec(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "512",
        "--gen-tokens",
        "8",
        "--repeat",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("need 520 positions; the model's context has 512"),
        "{err}"
    );
}

/// An unknown `LMSPEC_ACTIVATIONS` is refused with the variable, the value
/// and the modes; a known one loads.
#[test]
fn activations_from_the_environment_are_checked() {
    let _guard = mlx_lock();
    let model = goldens().join("llama/model");
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_lmspec"))
            .args(["logits", "--model", model.to_str().expect("utf-8")])
            .args(["--tokens", "1,2"])
            .env("LMSPEC_ACTIVATIONS", value)
            .current_dir(root())
            .output()
            .expect("lmspec runs")
    };
    let out = run("int4");
    assert!(!out.status.success(), "int4 accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("LMSPEC_ACTIVATIONS=int4") && err.contains("`int16`"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    for ok in ["float", "int8", "int16"] {
        let out = run(ok);
        assert!(
            out.status.success(),
            "{ok}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
