//! Tensor parallelism: `lmspec launch` runs ranks of MLX's ring backend on
//! this machine (the CPU), each holding its share of the model.
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lmspec::engine::distributed::Rank;
use lmspec::engine::weights::{self, Param, Quantization};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;

use crate::support::{goldens, library, mlx_lock, root};

fn lmspec(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("lmspec runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `lmspec launch -n RANKS -- lmspec golden CASES...`: its output (rank 0's).
fn golden_on(ranks: usize, cases: &[&str]) -> Output {
    let n = ranks.to_string();
    let mut args = vec![
        "launch",
        "-n",
        &n,
        "--timeout",
        "300",
        "--",
        "lmspec",
        "golden",
    ];
    let paths: Vec<String> = cases
        .iter()
        .map(|c| goldens().join(c).display().to_string())
        .collect();
    args.extend(paths.iter().map(String::as_str));
    lmspec(&args)
}

/// Every golden case whose spec declares `parallel` (the sharding each
/// such spec states is shown here).
fn parallel_cases() -> Vec<String> {
    let lib = library();
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(goldens()).expect("goldens") {
        let dir = entry.expect("entry").path();
        let meta = dir.join("meta.json");
        if !dir.join("golden.safetensors").exists() || !meta.exists() {
            continue;
        }
        let meta = crate::support::read_json(&meta);
        let Some(mt) = meta["model_type"].as_str() else {
            continue;
        };
        let config = dir.join("model/config.json");
        if lib
            .for_model_type(mt, &config)
            .is_ok_and(|s| s.parallel.is_some())
        {
            cases.push(
                dir.file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    cases.sort();
    cases
}

#[test]
fn sharded_goldens_match_the_reference_on_two_and_four_ranks() {
    // Dense, 4-bit and MoE cases of every spec with a `parallel` section:
    // logits within their tolerance of the mlx-lm reference and the same
    // greedy tokens, each rank holding half of every layer.
    let cases = parallel_cases();
    assert!(cases.len() >= 30, "{cases:?}");
    let names: Vec<&str> = cases.iter().map(String::as_str).collect();
    let out = golden_on(2, &names);
    let stdout = text(&out.stdout);
    for case in &cases {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(case.as_str()))
            .unwrap_or_else(|| panic!("no line for {case}:\n{stdout}"));
        if case == "qwen3_moe_q4" {
            // Its 4-bit experts' 32 intermediate features cannot be halved
            // into whole groups of 32.
            assert!(
                line.contains("does not keep whole quantization groups of 32"),
                "{line}"
            );
        } else {
            assert!(line.ends_with("pass"), "{line}");
        }
    }
    // Four ranks over two key/value heads: each head is copied to two.
    let out = golden_on(4, &["llama", "qwen3_moe", "gemma3_text"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("3 cases: 3 pass, 0 fail"),
        "{stdout}\n{}",
        text(&out.stderr)
    );
}

/// Rank `index` of `of`'s weights of the llama golden, bound by the graph
/// of that rank.
fn rank_weights(index: usize, of: usize) -> (lmspec::spec::Graph, Vec<Vec<Param>>) {
    let dir = goldens().join("llama/model");
    let lib = library();
    let (file, json) = lmspec::engine::model::read_config(&dir).expect("config");
    let spec = lib.load("llama").expect("spec");
    let (_, graph) =
        lmspec::spec::expand_for_ranks(&spec, &json, &file, of as i64).expect("expands");
    let ckpt = weights::load_safetensors_dir(&dir, None).expect("weights");
    let params = weights::bind(
        &graph,
        &ckpt.tensors,
        &Quantization::default(),
        &ckpt.file,
        Rank { index, of },
        &ckpt.files,
    )
    .expect("binds");
    (graph, params)
}

fn weight_of(graph: &lmspec::spec::Graph, params: &[Vec<Param>], path: &str) -> Array {
    let k = graph
        .nodes
        .iter()
        .position(|n| n.path == path)
        .unwrap_or_else(|| panic!("no node {path}"));
    match &params[k][0] {
        Param::Dense(w) => w.clone(),
        Param::Quantized { .. } => panic!("{path} is quantized"),
    }
}

fn assert_same(a: &Array, b: &Array, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes");
    let same = a.eq(b).and_then(|e| e.all(None)).expect("compares");
    same.eval().expect("evaluates");
    assert!(same.item_cast::<bool>(), "{what}: values differ");
}

#[test]
fn each_rank_binds_its_slice_of_the_checkpoint() {
    let _g = mlx_lock();
    let ckpt =
        weights::load_safetensors_dir(&goldens().join("llama/model"), None).expect("weights");
    let full = |name: &str| ckpt.tensors[name].clone();
    let q = full("model.layers.0.self_attn.q_proj.weight"); // [4 heads * 16, 64]
    let k = full("model.layers.0.self_attn.k_proj.weight"); // [2 heads * 16, 64]
    let o = full("model.layers.0.self_attn.o_proj.weight"); // [64, 4 * 16]
    let down = full("model.layers.0.mlp.down_proj.weight"); // [64, 128]
                                                            // Each rank reads its slices alone: half of every split tensor.
    let split: usize = ckpt
        .tensors
        .iter()
        .filter(|(n, _)| ["_proj.weight"].iter().any(|s| n.ends_with(s)))
        .map(|(_, a)| a.nbytes())
        .sum();
    for index in 0..2 {
        let before = weights::file_slice::bytes_read();
        let (graph, params) = rank_weights(index, 2);
        for p in params.iter().flatten() {
            if let Param::Dense(a) = p {
                a.eval().expect("reads");
            }
        }
        assert_eq!(
            (weights::file_slice::bytes_read() - before) as usize,
            split / 2
        );
        let r = index as i32;
        let q_r = q.try_index((r * 32..(r + 1) * 32, ..)).expect("rows");
        assert_same(
            &weight_of(&graph, &params, "layers.0.attn.q"),
            &q_r,
            "q rows",
        );
        let k_r = k.try_index((r * 16..(r + 1) * 16, ..)).expect("rows");
        assert_same(
            &weight_of(&graph, &params, "layers.0.attn.k"),
            &k_r,
            "k rows",
        );
        // Dense weights are bound as stored ([out, in]); columns split.
        let o_r = o.try_index((.., r * 32..(r + 1) * 32)).expect("columns");
        assert_same(
            &weight_of(&graph, &params, "layers.0.attn.o"),
            &o_r,
            "o columns",
        );
        let d_r = down.try_index((.., r * 64..(r + 1) * 64)).expect("columns");
        assert_same(
            &weight_of(&graph, &params, "layers.0.mlp.down"),
            &d_r,
            "down columns",
        );
        // The head and the norms are whole on every rank.
        assert_same(
            &weight_of(&graph, &params, "logits"),
            &full("lm_head.weight"),
            "lm_head",
        );
    }
    // Four ranks, two key/value heads: ranks 0 and 1 hold head 0, ranks 2
    // and 3 head 1; each rank has one query head of its own.
    for index in 0..4 {
        let (graph, params) = rank_weights(index, 4);
        let head = (index / 2) as i32;
        let k_r = k.try_index((head * 16..(head + 1) * 16, ..)).expect("rows");
        assert_same(
            &weight_of(&graph, &params, "layers.0.attn.k"),
            &k_r,
            "copied k head",
        );
        let r = index as i32;
        let q_r = q.try_index((r * 16..(r + 1) * 16, ..)).expect("rows");
        assert_same(
            &weight_of(&graph, &params, "layers.0.attn.q"),
            &q_r,
            "q head",
        );
    }
}

#[test]
fn bad_worlds_are_refused_with_the_config_key_and_the_spec() {
    // Three ranks cannot split four query heads.
    let out = golden_on(3, &["llama"]);
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("config.json: num_attention_heads")
            && stdout.contains("n_heads = 4 cannot be split over 3 ranks"),
        "{stdout}"
    );
    // Every rank fails alike; the launcher reports the first it sees.
    assert!(
        text(&out.stderr).contains(" of 3 exited"),
        "{}",
        text(&out.stderr)
    );
    // Four ranks cannot split 4-bit o_proj inputs of 64 into whole groups
    // of 32.
    let out = golden_on(4, &["llama_q4"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("o_proj.weight: splitting it")
            && stdout.contains("does not keep whole quantization groups of 32"),
        "{stdout}"
    );
    // A spec without a `parallel` section runs on one rank only.
    let out = golden_on(2, &["phi3"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("specs/models/phi3.yaml")
            && stdout.contains("declares no tensor parallelism"),
        "{stdout}"
    );
    // `--world-size` on a command starts the ranks itself.
    let out = lmspec(&["--world-size", "3", "golden", "goldens/llama"]);
    let stdout = text(&out.stdout);
    assert!(
        !out.status.success()
            && stdout.contains("(tensor parallel: 3 ranks)")
            && stdout.contains("n_heads = 4 cannot be split over 3 ranks"),
        "{stdout}"
    );
    let out = lmspec(&["golden", "--world-size=2", "goldens/llama"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("(tensor parallel: 2 ranks)"),
        "{stdout}"
    );
    // Interactive and network commands refuse to run as ranks.
    let out = Command::new(env!("CARGO_BIN_EXE_lmspec"))
        .args(["serve", "--port", "0"])
        .env("MLX_WORLD_SIZE", "2")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("runs on one rank only"));
}

#[test]
fn a_rank_that_dies_stops_the_others() {
    // Rank 1 of 3 is killed a few seconds into a long generation; the
    // others then wait on a collective that never completes until the
    // launcher stops them.
    let model = crate::generation::default_model();
    let script = "if [ \"$MLX_RANK\" = 1 ]; then timeout -s KILL 4 \"$0\" \"$@\"; exit 9; fi; exec \"$0\" \"$@\"";
    let start = Instant::now();
    let out = lmspec(&[
        "launch",
        "-n",
        "3",
        "--timeout",
        "300",
        "--",
        "sh",
        "-c",
        script,
        env!("CARGO_BIN_EXE_lmspec"),
        "generate",
        "--model",
        &model.display().to_string(),
        "--raw",
        "-p",
        "Count from 1 to 1000, separated by commas: 1, 2, 3,",
        "--max-tokens",
        "2000",
        "--temp",
        "0",
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 of 3 exited"), "{stderr}");
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "took {:?}",
        start.elapsed()
    );
    // A run that outlives --timeout is stopped too.
    let start = Instant::now();
    let out = lmspec(&["launch", "-n", "2", "--timeout", "1", "--", "sleep", "30"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--timeout 1 s"));
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn the_real_model_generates_the_same_text_on_three_ranks() {
    // SmolLM2-135M: 9 query heads, 3 key/value heads, 4-bit groups of 32.
    let model = crate::generation::default_model();
    let model = model.display().to_string();
    let args = [
        "generate",
        "--model",
        &model,
        "-p",
        "What is the capital of France?",
        "--max-tokens",
        "16",
        "--temp",
        "0",
    ];
    let one = lmspec(&args);
    assert!(one.status.success(), "{}", text(&one.stderr));
    let mut launched = vec!["launch", "-n", "3", "--timeout", "300", "--", "lmspec"];
    launched.extend(args);
    let three = lmspec(&launched);
    assert!(three.status.success(), "{}", text(&three.stderr));
    assert!(text(&one.stdout).contains("Paris"), "{}", text(&one.stdout));
    assert_eq!(text(&three.stdout), text(&one.stdout));
}

#[test]
fn moe_layers_split_by_whole_experts() {
    // qwen3_moe with `moe_shard: experts` (and its experts' width no
    // longer in `parallel.split`): each rank holds half (a quarter) of the
    // experts whole; a token's experts on other ranks count zero on this
    // one. Unlike the width split, the 4-bit experts split on two ranks.
    let dir = tempfile::tempdir().expect("tempdir");
    let specs = dir.path().join("specs");
    for sub in ["models", "blocks", "tool-formats", "registry"] {
        std::fs::create_dir_all(specs.join(sub)).expect("mkdir");
        for e in std::fs::read_dir(root().join("specs").join(sub)).expect("read") {
            let p = e.expect("entry").path();
            if p.is_file() {
                std::fs::copy(&p, specs.join(sub).join(p.file_name().expect("name")))
                    .expect("copy");
            }
        }
    }
    let spec = specs.join("models/qwen3_moe.yaml");
    let yaml = std::fs::read_to_string(&spec).expect("spec");
    let yaml = yaml
        .replace(
            "split: [n_heads, intermediate_size, moe_intermediate_size]",
            "split: [n_heads, intermediate_size]",
        )
        .replacen(
            "\nconfig:\n",
            "\nconfig:\n  moe_shard: {type: moe_shard, value: experts}\n",
            1,
        );
    assert!(yaml.contains("value: experts") && !yaml.contains("moe_intermediate_size]"));
    std::fs::write(&spec, yaml).expect("write");
    let specs = specs.display().to_string();
    for (ranks, cases) in [
        ("2", vec!["qwen3_moe", "qwen3_moe_q4", "qwen3_moe_hf"]),
        ("4", vec!["qwen3_moe", "qwen3_moe_hf"]),
    ] {
        let paths: Vec<String> = cases
            .iter()
            .map(|c| goldens().join(c).display().to_string())
            .collect();
        let mut args = vec![
            "launch",
            "-n",
            ranks,
            "--timeout",
            "300",
            "--",
            "lmspec",
            "--specs",
            &specs,
            "golden",
        ];
        args.extend(paths.iter().map(String::as_str));
        let out = lmspec(&args);
        let stdout = text(&out.stdout);
        let want = format!("{n} cases: {n} pass, 0 fail", n = cases.len());
        assert!(out.status.success() && stdout.contains(&want), "{stdout}");
    }
}
