//! Models by hub id, against a loopback hub (`hub_server`): downloads,
//! the cache, offline use, resumption, hashes, Python's cache, and bad
//! answers.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::hub_server::HubServer;
use crate::support::{goldens, root};

/// `lmspec ARGS` with a hub environment of its own.
fn lmspec_cmd(hub: &HubServer, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lmspec"));
    c.args(args)
        .current_dir(root())
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", &hub.endpoint)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    c
}

fn run(c: &mut Command) -> (bool, String, String) {
    let out: Output = c.output().expect("lmspec runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn tiny_files() -> Vec<(&'static str, Vec<u8>)> {
    let dir = goldens().join("llama/model");
    vec![
        (
            "config.json",
            std::fs::read(dir.join("config.json")).expect("config"),
        ),
        (
            "model.safetensors",
            std::fs::read(dir.join("model.safetensors")).expect("weights"),
        ),
        ("README.md", b"# tiny\n".to_vec()),
        ("pytorch_model.bin", vec![0u8; 64]),
    ]
}

/// The tiny golden model's safetensors split into two shards and an index.
fn sharded_files() -> Vec<(&'static str, Vec<u8>)> {
    let dir = goldens().join("llama/model");
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let half = names.len() / 2;
    let mut index = serde_json::Map::new();
    let mut shards = Vec::new();
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let file = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ][i];
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).expect("tensor")))
            .collect();
        for n in part {
            index.insert(n.clone(), file.into());
        }
        shards.push((
            file,
            safetensors::serialize(views, None).expect("serialize"),
        ));
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": index});
    let mut files = vec![
        (
            "config.json",
            std::fs::read(dir.join("config.json")).expect("config"),
        ),
        (
            "model.safetensors.index.json",
            index.to_string().into_bytes(),
        ),
    ];
    files.extend(shards);
    files
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy");
        }
    }
}

fn default_gguf() -> PathBuf {
    lmspec::default_model()
        .filter(|p| p.exists())
        .expect("the default model is installed by the setup")
}

fn file_requests(log: &[String]) -> Vec<&String> {
    log.iter()
        .filter(|l| l.contains("/resolve/") || l.contains("/cdn/"))
        .collect()
}

#[test]
fn a_hub_id_downloads_once_then_runs_from_the_cache_and_offline() {
    let hub = HubServer::start();
    hub.add_repo("test-org/tiny", tiny_files());
    hub.add_repo("test-org/sharded", sharded_files());
    let gguf = std::fs::read(default_gguf()).expect("gguf");
    hub.add_repo(
        "test-org/smollm2-gguf",
        vec![
            ("README.md", b"# gguf\n".to_vec()),
            ("SmolLM2-135M-Instruct.Q4_1.gguf", gguf),
        ],
    );
    let home = tempfile::tempdir().expect("tempdir");
    let local = goldens().join("llama/model");
    let local = local.to_str().expect("utf-8");
    let (ok, want, err) = run(&mut lmspec_cmd(
        &hub,
        home.path(),
        &["logits", "--model", local, "--tokens", "1,2,3"],
    ));
    assert!(ok, "{err}");

    for id in ["test-org/tiny", "test-org/sharded"] {
        let (ok, got, err) = run(&mut lmspec_cmd(
            &hub,
            home.path(),
            &["logits", "--model", id, "--tokens", "1,2,3"],
        ));
        assert!(ok, "{id}: {err}");
        assert_eq!(got, want, "{id}");
        if id.ends_with("sharded") {
            assert!(err.contains("loading weights: 2/2 files"), "{err}");
        }
        let log = hub.take_log();
        // Only what a model needs: not the README or the .bin.
        assert!(
            !log.iter()
                .any(|l| l.contains("README") || l.contains(".bin")),
            "{log:?}"
        );
        let (ok, again, err) = run(&mut lmspec_cmd(
            &hub,
            home.path(),
            &["logits", "--model", id, "--tokens", "1,2,3"],
        ));
        assert!(ok, "{err}");
        assert_eq!(again, want);
        assert_eq!(
            hub.take_log(),
            Vec::<String>::new(),
            "{id}: the second run asks nothing"
        );
    }

    // A registry entry (a spec folder of its own) supplies the default
    // prompt; without one, no prompt is an error.
    let specs = tempfile::tempdir().expect("tempdir");
    copy_dir(&root().join("specs"), specs.path());
    std::fs::write(
        specs.path().join("registry/test.yaml"),
        "registry_version: 1\nmodels:\n  - ids: [test-org/smollm2-gguf]\n    default_prompt: What is the capital of France?\n    extra_eos: [\"<|im_end|>\"]\n",
    )
    .expect("write");
    let specs_arg = specs.path().to_str().expect("utf-8");
    let (ok, out, err) = run(&mut lmspec_cmd(
        &hub,
        home.path(),
        &[
            "--specs",
            specs_arg,
            "generate",
            "--model",
            "test-org/smollm2-gguf",
            "--max-tokens",
            "12",
        ],
    ));
    assert!(ok, "{err}");
    assert!(out.contains("Paris"), "{out}");
    let (ok, _, err) = run(&mut lmspec_cmd(
        &hub,
        home.path(),
        &["generate", "--model", "test-org/smollm2-gguf"],
    ));
    assert!(!ok && err.contains("give a prompt with -p"), "{err}");
    assert!(!file_requests(&hub.take_log()).is_empty());
    let prompt = [
        "generate",
        "--model",
        "test-org/smollm2-gguf",
        "-p",
        "What is the capital of France?",
        "--max-tokens",
        "12",
    ];
    let (ok, out, err) = run(&mut lmspec_cmd(&hub, home.path(), &prompt));
    assert!(ok, "{err}");
    assert!(out.contains("Paris"), "{out}");
    assert!(hub.take_log().is_empty(), "cached by the first run");
    let (ok, out, err) = run(lmspec_cmd(&hub, home.path(), &prompt).env("HF_HUB_OFFLINE", "1"));
    assert!(ok && out.contains("Paris"), "{out}{err}");
    assert!(hub.take_log().is_empty());

    // `ls` shows the cache; offline with an empty cache fails clearly.
    let (ok, out, err) = run(&mut lmspec_cmd(&hub, home.path(), &["ls"]));
    assert!(ok, "{err}");
    for id in ["test-org/tiny", "test-org/sharded", "test-org/smollm2-gguf"] {
        assert!(out.contains(id), "{out}");
    }
    assert!(out.contains("spec llama"), "{out}");
    let empty = tempfile::tempdir().expect("tempdir");
    let (ok, _, err) = run(lmspec_cmd(
        &hub,
        empty.path(),
        &["logits", "--model", "test-org/tiny", "--tokens", "1"],
    )
    .env("HF_HUB_OFFLINE", "1"));
    assert!(!ok);
    assert!(
        err.contains("test-org/tiny@main: HF_HUB_OFFLINE is set"),
        "{err}"
    );
    assert!(hub.take_log().is_empty());
    let (ok, out, _) = run(&mut lmspec_cmd(&hub, home.path(), &["rm", "test-org/tiny"]));
    assert!(ok && out.contains("removed test-org/tiny"));
    let (ok, _, err) = run(&mut lmspec_cmd(&hub, home.path(), &["rm", "test-org/tiny"]));
    assert!(!ok && err.contains("not in the hub cache"), "{err}");
}

/// The blob folder of a cached repository.
fn blobs(home: &Path, repo: &str) -> PathBuf {
    home.join("hub")
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("blobs")
}

fn part_len(home: &Path, repo: &str) -> u64 {
    std::fs::read_dir(blobs(home, repo))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_killed_download_resumes_to_identical_bytes() {
    let hub = HubServer::start();
    let files = tiny_files();
    let weights = files[1].1.clone();
    hub.add_repo("test-org/tiny", files);
    let home = tempfile::tempdir().expect("tempdir");
    let half = weights.len() / 2;
    hub.stall("model.safetensors", half);
    let mut child = lmspec_cmd(&hub, home.path(), &["pull", "test-org/tiny"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    while part_len(home.path(), "test-org/tiny") < half as u64 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the download never reached half"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill");
    let _ = child.wait();
    hub.release();
    hub.take_log();
    // A partial file is never used as a complete one.
    let (ok, _, err) = run(lmspec_cmd(
        &hub,
        home.path(),
        &["logits", "--model", "test-org/tiny", "--tokens", "1"],
    )
    .env("HF_HUB_OFFLINE", "1"));
    assert!(!ok && err.contains("HF_HUB_OFFLINE"), "{err}");
    let (ok, out, err) = run(&mut lmspec_cmd(
        &hub,
        home.path(),
        &["pull", "test-org/tiny"],
    ));
    assert!(ok, "{err}");
    let log = hub.take_log();
    assert!(
        log.iter().any(|l| l.contains(&format!("[bytes={half}-]"))),
        "resumed from byte {half}: {log:?}"
    );
    let snapshot = PathBuf::from(out.trim());
    assert_eq!(
        std::fs::read(snapshot.join("model.safetensors")).expect("read"),
        weights
    );
    assert_eq!(part_len(home.path(), "test-org/tiny"), 0);
}

#[test]
fn a_file_whose_content_does_not_match_its_hash_is_rejected() {
    let hub = HubServer::start();
    hub.add_repo("test-org/tiny", tiny_files());
    hub.corrupt("model.safetensors");
    let home = tempfile::tempdir().expect("tempdir");
    let (ok, _, err) = run(&mut lmspec_cmd(
        &hub,
        home.path(),
        &["pull", "test-org/tiny"],
    ));
    assert!(!ok);
    assert!(
        err.contains("test-org/tiny: model.safetensors: sha256"),
        "{err}"
    );
    assert!(err.contains("removed from the cache"), "{err}");
    let left: Vec<_> = std::fs::read_dir(blobs(home.path(), "test-org/tiny"))
        .expect("blobs")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.len() == 64)
        .collect();
    assert!(left.is_empty(), "the bad blob stays: {left:?}");
}

/// A download that fails its check once is fetched again; a cached file
/// damaged later is found and fetched again by `pull`.
#[test]
fn a_bad_download_or_a_damaged_cached_file_is_fetched_again() {
    let hub = HubServer::start();
    let files = tiny_files();
    let weights = files[1].1.clone();
    hub.add_repo("test-org/tiny", files);
    hub.corrupt_times("model.safetensors", 1);
    let home = tempfile::tempdir().expect("tempdir");
    let (ok, out, err) = run(&mut lmspec_cmd(
        &hub,
        home.path(),
        &["pull", "test-org/tiny"],
    ));
    assert!(ok, "{err}");
    assert!(
        err.contains("model.safetensors: sha256") && err.contains("fetching it again"),
        "{err}"
    );
    let file = PathBuf::from(out.trim()).join("model.safetensors");
    assert_eq!(std::fs::read(&file).expect("read"), weights);
    // Damage the cached blob: a plain run uses the cache as is, `pull`
    // re-checks it and fetches it again.
    let blob = std::fs::canonicalize(&file).expect("blob");
    let mut damaged = weights.clone();
    damaged[100] ^= 1;
    std::fs::write(&blob, &damaged).expect("write");
    hub.take_log();
    let (ok, _, err) = run(&mut lmspec_cmd(
        &hub,
        home.path(),
        &["pull", "test-org/tiny"],
    ));
    assert!(ok, "{err}");
    assert!(err.contains("fetching it again"), "{err}");
    assert_eq!(std::fs::read(&file).expect("read"), weights);
}

#[test]
fn a_cache_written_by_python_huggingface_hub_is_used_as_is() {
    let hub = HubServer::start();
    hub.add_repo("test-org/tiny", tiny_files());
    let home = tempfile::tempdir().expect("tempdir");
    let script = "import sys\nfrom huggingface_hub import snapshot_download\nprint(snapshot_download('test-org/tiny'))";
    let out = Command::new(root().join(".venv/bin/python"))
        .args(["-c", script])
        .env("HF_HOME", home.path())
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!file_requests(&hub.take_log()).is_empty());
    let (ok, got, err) = run(&mut lmspec_cmd(
        &hub,
        home.path(),
        &["logits", "--model", "test-org/tiny", "--tokens", "1,2,3"],
    ));
    assert!(ok, "{err}");
    assert!(got.contains("logits"), "{got}");
    assert_eq!(
        hub.take_log(),
        Vec::<String>::new(),
        "lmspec used Python's cache"
    );
}

#[test]
fn bad_hub_answers_give_clear_errors() {
    let hub = HubServer::start();
    hub.add_repo("test-org/tiny", tiny_files());
    hub.add_repo("test-org/gated", tiny_files());
    hub.gate("test-org/gated", "secret");
    hub.add_repo(
        "test-org/readme-only",
        vec![("README.md", b"# nothing\n".to_vec())],
    );
    let home = tempfile::tempdir().expect("tempdir");
    let fails = |cmd: &mut Command, want: &str| {
        let (ok, _, err) = run(cmd);
        assert!(!ok, "{want}");
        assert!(err.contains(want), "want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    let logits = |id: &str| ["logits", "--model", id, "--tokens", "1"].map(String::from);
    let cmd = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lmspec_cmd(&hub, home.path(), &args)
    };
    fails(
        &mut cmd(&logits("test-org/nope")),
        "test-org/nope: not found on http://127.0.0.1",
    );
    fails(
        &mut cmd(&logits("test-org/tiny@v9")),
        "or it has no revision v9",
    );
    fails(
        &mut cmd(&logits("test-org/readme-only")),
        "test-org/readme-only: the repository has no config.json and no .gguf file",
    );
    fails(
        &mut cmd(&logits("test-org/gated")),
        "HTTP 401): the repository is private, gated or absent; set HF_TOKEN",
    );
    fails(
        cmd(&logits("test-org/gated")).env("HF_TOKEN", "wrong"),
        "HTTP 403): the token has no access",
    );
    let (ok, _, err) = run(cmd(&logits("test-org/gated")).env("HF_TOKEN", "secret"));
    assert!(ok, "{err}");
    fails(
        &mut cmd(&["pull".into(), "not/an/id".into()]),
        "is not a hub id",
    );
    fails(
        &mut cmd(&[
            "logits".into(),
            "--model".into(),
            "test-org/tiny".into(),
            "--gguf-file".into(),
            "Q4_K_M".into(),
            "--tokens".into(),
            "1".into(),
        ]),
        "--gguf-file was given but the repository has no .gguf file",
    );
    // A server that drops the connection half way, on every try.
    let weights = tiny_files()[1].1.len();
    hub.drop_after("model.safetensors", weights / 3);
    fails(
        &mut cmd(&logits("test-org/tiny")),
        "test-org/tiny: downloading model.safetensors",
    );
    let (ok, _, err) = run(cmd(&logits("test-org/tiny")).env("HF_HUB_OFFLINE", "1"));
    assert!(
        !ok && err.contains("HF_HUB_OFFLINE"),
        "a partial file is not complete: {err}"
    );
    // The hub is gone.
    let gone = format!("http://{}", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    });
    fails(
        cmd(&logits("test-org/other")).env("HF_ENDPOINT", &gone),
        "test-org/other: listing the repository",
    );
}
