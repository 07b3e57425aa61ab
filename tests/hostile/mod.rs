//! The hostile-input corpus: every case runs the `lmspec` binary on one bad
//! input and must end with a clean error: exit code 1 or 2, a message that
//! names the file (or argument) and the field, no panic, no signal, within
//! its time bound. One test per input category; each lists every failing
//! case before it fails.
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::{goldens, root};

mod cases;
mod files;

/// One hostile input: the arguments, optional stdin, and the substrings the
/// error must contain.
pub struct Case {
    pub name: String,
    pub args: Vec<String>,
    pub stdin: Option<Vec<u8>>,
    pub env: Vec<(String, String)>,
    pub expect: Vec<String>,
    pub bound: Duration,
    /// The input is accepted: exit 0 within the bound.
    pub succeeds: bool,
}

impl Case {
    pub fn new(name: impl Into<String>, args: &[&str], expect: &[&str]) -> Case {
        Case {
            name: name.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin: None,
            env: Vec::new(),
            expect: expect.iter().map(|s| s.to_string()).collect(),
            bound: Duration::from_secs(30),
            succeeds: false,
        }
    }

    pub fn succeeds(mut self) -> Case {
        self.succeeds = true;
        self
    }

    pub fn stdin(mut self, bytes: Vec<u8>) -> Case {
        self.stdin = Some(bytes);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Case {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// Runs `case`; `Err` says what was wrong with the outcome.
fn run(case: &Case) -> Result<(), String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lmspec"));
    cmd.args(&case.args)
        .env("LMSPEC_SPECS", root().join("specs"))
        .env_remove("RUST_BACKTRACE")
        .stdin(if case.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in &case.env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    if let Some(bytes) = &case.stdin {
        if let Some(mut pipe) = child.stdin.take() {
            // The program may stop reading early (that is the point).
            let _ = pipe.write_all(bytes);
        }
    }
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > case.bound {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {:?}", case.bound));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let err = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
    if std::env::var_os("LMSPEC_SHOW_ERRORS").is_some() {
        eprintln!("[{}] {}", case.name, err.trim_end());
    }
    let tail: String = err
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    match status.code() {
        Some(0) if case.succeeds => return Ok(()),
        Some(1) | Some(2) if !case.succeeds => {}
        Some(c) => return Err(format!("exit code {c}: {tail}")),
        None => return Err(format!("killed by a signal ({status}): {tail}")),
    }
    for bad in ["panicked", "RUST_BACKTRACE", "/target/", "mlx-sys", ".cpp"] {
        if err.contains(bad) {
            return Err(format!("stderr contains '{bad}': {tail}"));
        }
    }
    for want in &case.expect {
        if !err.contains(want.as_str()) {
            return Err(format!("stderr lacks '{want}': {tail}"));
        }
    }
    Ok(())
}

/// Runs every case; fails listing each case whose outcome was wrong.
pub fn run_all(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(why) = run(case) {
            failures.push(format!("- {}: {why}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// A scratch folder of hostile files.
pub struct Scratch {
    pub dir: TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `bytes` to `name` (folders made as needed); returns its path.
    pub fn file(&self, name: &str, bytes: impl AsRef<[u8]>) -> String {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(&p, bytes).expect("write");
        p.display().to_string()
    }

    /// A copy of the project's spec folder as `name`, with `file` (a path
    /// inside it) written as `text`; returns the folder.
    pub fn specs_with(&self, name: &str, file: &str, text: impl AsRef<[u8]>) -> String {
        fn copy(from: &std::path::Path, to: &std::path::Path) {
            fs::create_dir_all(to).expect("mkdir");
            for e in fs::read_dir(from).expect("read_dir") {
                let p = e.expect("entry").path();
                let dest = to.join(p.file_name().expect("name"));
                if p.is_dir() {
                    copy(&p, &dest);
                } else {
                    fs::copy(&p, &dest).expect("copy");
                }
            }
        }
        copy(&root().join("specs"), &self.path(name));
        self.file(&format!("{name}/{file}"), text);
        self.path(name).display().to_string()
    }

    /// A copy of the tiny llama golden model with a tokenizer and a chat
    /// template, as folder `name`; `edit` changes its config.
    pub fn model(&self, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        self.model_of("llama", name, edit)
    }

    /// Like [`Scratch::model`], from the golden case `case`.
    pub fn model_of(
        &self,
        case: &str,
        name: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> String {
        let dir = self.path(name);
        fs::create_dir_all(&dir).expect("mkdir");
        let src = goldens().join(case).join("model");
        fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).expect("copy");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(src.join("config.json")).expect("read"))
                .expect("json");
        edit(&mut cfg);
        fs::write(dir.join("config.json"), cfg.to_string()).expect("write");
        fs::write(dir.join("tokenizer.json"), files::tokenizer_json(256)).expect("write");
        fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::json!({
                "eos_token": "</s>",
                "chat_template": files::CHAT_TEMPLATE,
            })
            .to_string(),
        )
        .expect("write");
        dir.display().to_string()
    }
}

/// One test per category, and one that counts them all.
macro_rules! categories {
    ($($test:ident => $cases:ident,)+) => {
        $(
            #[test]
            fn $test() {
                let s = Scratch::new();
                run_all(cases::$cases(&s));
            }
        )+

        #[test]
        fn the_corpus_has_at_least_150_cases() {
            let s = Scratch::new();
            let counts = [$((stringify!($cases), cases::$cases(&s).len())),+];
            let n: usize = counts.iter().map(|(_, k)| k).sum();
            eprintln!("hostile cases: {n} {counts:?}");
            assert!(n >= 150, "{n} cases");
        }
    };
}

categories! {
    config_values => config,
    safetensors_files => safetensors,
    gguf_files => gguf,
    spec_files => spec,
    templates_and_tokenizers => template_tokenizer,
    prompts_and_parameters => prompts_parameters,
    tools => tools,
    resources => resources,
}
