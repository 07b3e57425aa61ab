//! `lmspec serve` driven over loopback by the official `openai` and
//! `anthropic` Python clients (`tests/server/clients.py`), a bounded load
//! test (`tests/server/load.py`), and its lifecycle (a refused start, a clean
//! stop on SIGTERM).
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::root;

/// A running server, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lmspec"))
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("lmspec serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("the server reports its address");
        let url = line
            .trim()
            .strip_prefix("lmspec serve: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Server { child, url }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// SIGTERM, then the exit status (within 60 s).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling a child process this test started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

fn embedder_dir() -> String {
    lmspec::default_embedder()
        .expect("all-MiniLM-L6-v2 installed by .ci/setup.sh")
        .display()
        .to_string()
}

/// Runs a script of `tests/server/` and asserts it succeeds.
fn run_script(script: &str, args: &[String]) {
    let out = Command::new(python())
        .arg(root().join("tests/server").join(script))
        .args(args)
        .current_dir(root())
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{stdout}");
}

#[test]
fn official_clients_pass_every_check() {
    let emb = embedder_dir();
    let mut server = Server::start(&["--api-key", "test-key", "--embedding-model", &emb]);
    let args: Vec<String> = [
        "--base-url",
        &server.url,
        "--model",
        "default",
        "--api-key",
        "test-key",
        "--embedding-model",
        &emb,
        "--embedding-dir",
        &emb,
        "--lmspec",
        env!("CARGO_BIN_EXE_lmspec"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    run_script("clients.py", &args);
    let status = server.stop().expect("the server stops on SIGTERM");
    assert!(status.success(), "a clean exit after SIGTERM: {status:?}");
}

/// A client that resets its connection mid-stream makes the server's next
/// vectored write fail with SIGPIPE: the server ignores the signal (the
/// other commands end on it, as command-line tools do).
#[test]
fn the_server_ignores_sigpipe() {
    let server = Server::start(&[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .expect("the server's /proc status");
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).expect("a hex mask"))
        .expect("SigIgn");
    assert!(
        ignored & (1 << (13 - 1)) != 0,
        "SIGPIPE (13) is not ignored: {ignored:x}"
    );
}

#[test]
fn load_test_loses_nothing_and_memory_returns() {
    let server = Server::start(&["--max-batch", "32"]);
    let args: Vec<String> = [
        "--base-url",
        &server.url,
        "--model",
        "default",
        "--streams",
        "64",
        "--requests",
        "200",
        "--phase1-max-tokens",
        "16",
        "--max-tokens",
        "24",
        "--pid",
        &server.pid(),
        // Time for the idle server to hand its buffers back on a busy
        // machine; the check ends as soon as memory is back.
        "--settle",
        "30",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    run_script("load.py", &args);
}

#[test]
fn a_model_that_cannot_load_is_refused_before_listening() {
    let out = Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args(["serve", "--port", "0", "--model", "/nonexistent/model-dir"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(stderr.contains("/nonexistent/model-dir"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
fn http(url: &str, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status: u16 = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let json = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

#[test]
fn a_request_that_can_never_fit_the_budget_is_refused_at_once() {
    // SmolLM2 keeps 30 layers x 2 x 3 heads x 64 x 4 bytes = 46 KB per
    // position: 4 MB holds about 87 positions.
    let server = Server::start(&["--kv-budget-mb", "4"]);
    let chat = |max_tokens: u32| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": {max_tokens}, "temperature": 0}}"#
        )
    };
    let (status, body) = http(&server.url, "POST", "/v1/chat/completions", &chat(500));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("budget"), "{msg}");
    let (status, body) = http(&server.url, "POST", "/v1/chat/completions", &chat(4));
    assert_eq!(status, 200, "a request that fits is served: {body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    // Two requests that fit one at a time but not together: the second
    // waits for the first one's memory ticket to end, then runs.
    let both: Vec<_> = (0..2)
        .map(|_| {
            let url = server.url.clone();
            let body = serde_json::json!({
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 40,
                "temperature": 0,
                "ignore_eos": true,
            })
            .to_string();
            std::thread::spawn(move || http(&url, "POST", "/v1/chat/completions", &body))
        })
        .collect();
    for t in both {
        let (status, body) = t.join().expect("client");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 40, "{body}");
    }
    let (status, body) = http(&server.url, "GET", "/health", "");
    assert_eq!(status, 200);
    assert!(body["memory"]["active_bytes"].as_u64().is_some(), "{body}");
}

#[test]
fn rerank_matches_the_reranker_and_names_bad_fields() {
    let dir = crate::support::goldens().join("embeddings/reranker/model");
    let dir_s = dir.display().to_string();
    let reference = crate::support::read_json(&dir.parent().expect("case").join("reference.json"));
    let server = Server::start(&["--rerank-model", &dir_s]);
    let body = serde_json::json!({
        "model": dir_s,
        "query": reference["query"],
        "documents": reference["documents"],
        "top_n": 2,
        "return_documents": true,
    });
    let (status, got) = http(&server.url, "POST", "/v1/rerank", &body.to_string());
    assert_eq!(status, 200, "{got}");
    let results = got["results"].as_array().expect("results");
    assert_eq!(results.len(), 2);
    let order: Vec<usize> = reference["order"]
        .as_array()
        .expect("order")
        .iter()
        .map(|k| k.as_u64().expect("k") as usize)
        .collect();
    let scores = reference["scores"].as_array().expect("scores");
    for (r, &want) in results.iter().zip(&order) {
        let index = r["index"].as_u64().expect("index") as usize;
        assert_eq!(index, want, "{got}");
        let (s, w) = (
            r["relevance_score"].as_f64().expect("score"),
            scores[index].as_f64().expect("score"),
        );
        assert!((s - w).abs() <= 1e-5 * w.abs().max(1.0), "{s} vs {w}");
        assert_eq!(r["document"]["text"], reference["documents"][index]);
    }
    let (status, bad) = http(
        &server.url,
        "POST",
        "/v1/rerank",
        r#"{"query": "q", "documents": [1]}"#,
    );
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"]["param"], "documents[0]", "{bad}");
    let (status, bad) = http(&server.url, "POST", "/v1/embeddings", r#"{"input": "x"}"#);
    assert_eq!(status, 404, "no embedder served: {bad}");
    assert_eq!(bad["error"]["code"], "model_not_found");
}
