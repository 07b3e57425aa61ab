//! Spec-language behaviour that needs no MLX: `split`, block-owned knobs,
//! the built-in library, `--explain`, the op reference.
use std::path::{Path, PathBuf};

use lmspec_spec::expr::Value;
use lmspec_spec::{check, expand_for, render, Error, SpecLibrary};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A library folder holding the repository's blocks plus `models`.
fn library_with(models: &[(&str, &str)]) -> (tempfile::TempDir, SpecLibrary) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("models")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("blocks")).expect("mkdir");
    for entry in std::fs::read_dir(root().join("specs/blocks")).expect("blocks") {
        let p = entry.expect("entry").path();
        std::fs::copy(
            &p,
            dir.path().join("blocks").join(p.file_name().expect("name")),
        )
        .expect("copy");
    }
    for (name, text) in models {
        std::fs::write(dir.path().join("models").join(name), text).expect("write");
    }
    let lib = SpecLibrary::open(dir.path()).expect("library");
    (dir, lib)
}

const SPLIT: &str = "spec_version: 1
name: tiny
model_types: [tiny]
config:
  d: {type: int, value: 8}
model:
  inputs: [tokens]
  nodes:
    embed: {op: embedding, in: tokens, weight: emb, vocab: 10, dim: 3 * d}
    parts: {op: split, in: embed, sizes: [d, 2 * d], out: [a, b]}
    a2: {op: scale, in: a, factor: 2.0}
    both: {op: concat, in: [a2, b]}
  output: both
";

#[test]
fn split_cuts_a_value_into_named_parts() {
    let (_dir, lib) = library_with(&[("tiny.yaml", SPLIT)]);
    let spec = lib.load("tiny").expect("load");
    let (_, g) =
        expand_for(&spec, &serde_json::json!({}), Path::new("config.json")).expect("expand");
    let text = render::dump(&g, false);
    assert!(
        text.contains("a = slice(embed) -> [B, T, 8] {start=0, size=8}"),
        "{text}"
    );
    assert!(
        text.contains("b = slice(embed) -> [B, T, 16] {start=8, size=16}"),
        "{text}"
    );
    assert!(
        text.contains("both = concat(a2, b) -> [B, T, 24]"),
        "{text}"
    );
}

#[test]
fn split_errors_name_the_field() {
    let bad = SPLIT.replace("out: [a, b]", "out: [a]");
    let (_dir, lib) = library_with(&[("tiny.yaml", &bad)]);
    let spec = lib.load("tiny").expect("load");
    match check(&spec).expect_err("one name for two sizes") {
        Error::Spec {
            node, field, msg, ..
        } => {
            assert_eq!(
                (node.as_str(), field.as_str()),
                ("model.nodes.parts", "out")
            );
            assert!(msg.contains("1 names for 2 sizes"), "{msg}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn blocks_own_their_knobs() {
    let lib = SpecLibrary::open(&root().join("specs")).expect("library");
    let llama = lib.load("llama").expect("llama");
    // The attention block's knob comes from the block library file...
    let fused = llama
        .config
        .get("fused_qkv")
        .expect("fused_qkv is declared");
    assert!(
        fused.file.ends_with("blocks/transformer.yaml"),
        "{}",
        fused.file.display()
    );
    // ...and a child that sets it overrides the library's value.
    let phi3 = lib.load("phi3").expect("phi3");
    let fused = phi3.config.get("fused_qkv").expect("fused_qkv");
    assert!(
        fused.file.ends_with("models/phi3.yaml"),
        "{}",
        fused.file.display()
    );
    // A spec that runs none of those blocks does not get their knobs.
    let mamba = lib.load("mamba2").expect("mamba2");
    assert!(!mamba.config.contains_key("fused_qkv"));
}

#[test]
fn llama_declares_no_knob_only_other_specs_read() {
    let text = std::fs::read_to_string(root().join("specs/models/llama.yaml")).expect("llama");
    let llama: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    let own = serde_yaml::to_string(&llama["model"]).expect("model block")
        + &serde_yaml::to_string(&llama["layers"]).expect("layers")
        + &serde_yaml::to_string(&llama["weights"]).expect("weights");
    let blocks: String = std::fs::read_dir(root().join("specs/blocks"))
        .expect("blocks")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("read"))
        .collect();
    let config = llama["config"].as_mapping().expect("config");
    for key in config.keys() {
        let name = key.as_str().expect("name");
        let read_by_others = config
            .values()
            .any(|v| serde_yaml::to_string(v).expect("v").contains(name));
        assert!(
            own.contains(name) || blocks.contains(name) || read_by_others,
            "llama.yaml declares '{name}' but neither llama nor the blocks it runs read it"
        );
    }
}

#[test]
fn the_built_in_library_is_the_source_tree() {
    let built_in = SpecLibrary::embedded().expect("embedded");
    let tree = SpecLibrary::open(&root().join("specs")).expect("tree");
    let a: Vec<&str> = built_in.names().collect();
    let b: Vec<&str> = tree.names().collect();
    assert_eq!(a, b);
    for name in a {
        let (x, y) = (
            built_in.load(name).expect(name),
            tree.load(name).expect(name),
        );
        assert_eq!(x.config.len(), y.config.len(), "{name}");
        assert!(x.file.starts_with("specs/models"), "{}", x.file.display());
    }
    assert!(!built_in
        .root
        .files("tool-formats")
        .expect("formats")
        .is_empty());
}

#[test]
fn explain_lists_skipped_nodes_and_origins() {
    let lib = SpecLibrary::open(&root().join("specs")).expect("library");
    let spec = lib.load("llama").expect("llama");
    let file = root().join("goldens/llama/model/config.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    let (_, g) = expand_for(&spec, &json, &file).expect("expand");
    let text = render::dump(&g, true);
    assert!(
        text.contains("# skipped layers.0.attn.qkv (when false at"),
        "{text}"
    );
    assert!(
        text.contains("blocks.attention.nodes.qkv) = layers.0.attn_norm"),
        "{text}"
    );
    assert!(
        text.contains("layers.0.attn.q = linear(layers.0.attn_norm)"),
        "{text}"
    );
    assert!(
        text.contains("blocks/transformer.yaml: blocks.attention.nodes.q"),
        "{text}"
    );
}

#[test]
fn the_op_reference_is_current() {
    let want = lmspec_spec::render::op_reference();
    let path = root().join("docs/ops.md");
    if std::env::var_os("LMSPEC_WRITE_DOCS").is_some() {
        std::fs::write(&path, &want).expect("write docs/ops.md");
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/ops.md is stale: run LMSPEC_WRITE_DOCS=1 cargo test -p lmspec-spec the_op_reference_is_current"
    );
}

#[test]
fn a_missing_parent_names_the_extends_field() {
    let child = "spec_version: 1\nextends: nowhere.yaml\nmodel_types: [orphan]\n";
    let (_dir, lib) = library_with(&[("orphan.yaml", child)]);
    match lib.load("orphan").expect_err("no parent") {
        Error::Spec {
            file,
            node,
            field,
            msg,
        } => {
            assert!(file.ends_with("models/orphan.yaml"), "{}", file.display());
            assert_eq!((node.as_str(), field.as_str()), ("<document>", "extends"));
            assert_eq!(msg, "'nowhere.yaml': no spec has this name");
        }
        other => panic!("{other}"),
    }
}

const CHOICE: &str = "spec_version: 1
name: tiny
model_types: [tiny]
config:
  act_kind: {type: act, default: silu}
model:
  inputs: [tokens]
  nodes:
    embed: {op: embedding, in: tokens, weight: emb, vocab: 10, dim: 4}
    out: {op: activation, in: embed, fn: =act_kind}
  output: out
";

#[test]
fn an_enum_typed_entry_is_checked_when_bound() {
    let (_dir, lib) = library_with(&[("tiny.yaml", CHOICE)]);
    let spec = lib.load("tiny").expect("load");
    let file = Path::new("config.json");
    let ok = expand_for(&spec, &serde_json::json!({"act_kind": "gelu"}), file).expect("gelu");
    assert!(render::dump(&ok.1, false).contains("{fn='gelu'}"));
    match expand_for(&spec, &serde_json::json!({"act_kind": "telepathy"}), file)
        .expect_err("not an activation")
    {
        Error::Config { key, msg, .. } => {
            assert_eq!(key, "act_kind");
            assert!(
                msg.starts_with("'telepathy' is not one of the act words (silu, gelu"),
                "{msg}"
            );
        }
        other => panic!("{other}"),
    }
}

#[test]
fn check_refuses_an_enum_entry_the_parameter_cannot_take() {
    let bad = CHOICE.replace(
        "{type: act, default: silu}",
        "{type: routing, default: softmax_topk}",
    );
    let (_dir, lib) = library_with(&[("tiny.yaml", &bad)]);
    let spec = lib.load("tiny").expect("load");
    match check(&spec).expect_err("a routing is no activation") {
        Error::Spec {
            node, field, msg, ..
        } => {
            assert_eq!((node.as_str(), field.as_str()), ("model.nodes.out", "fn"));
            assert!(
                msg.starts_with(
                    "config entry 'act_kind' is of type routing, which allows 'softmax_topk'"
                ),
                "{msg}"
            );
        }
        other => panic!("{other}"),
    }
}

#[test]
fn reshape_repeat_and_l2_normalize_rules_are_checked() {
    let rules = "weights:
  rules:
    - reshape: {match: \"l.{i}.conv\", shape: [-1, d, 1]}
    - repeat: {match: \"l.{i}.conv\", axis: 0, times: d // 2}
    - l2_normalize: {match: head.weight, eps: 1e-7}
";
    let good = format!("{SPLIT}{rules}");
    let (_dir, lib) = library_with(&[("tiny.yaml", &good)]);
    check(&lib.load("tiny").expect("load")).expect("the rules check");

    let two_unknown = good.replace("[-1, d, 1]", "[-1, -1]");
    let (_dir, lib) = library_with(&[("tiny.yaml", &two_unknown)]);
    match check(&lib.load("tiny").expect("load")).expect_err("two -1 sizes") {
        Error::Spec { field, msg, .. } => {
            assert_eq!(field, "reshape");
            assert!(msg.contains("at most one size may be -1"), "{msg}");
        }
        other => panic!("{other}"),
    }
    let bad_eps = good.replace("eps: 1e-7", "eps: -1.0");
    let (_dir, lib) = library_with(&[("tiny.yaml", &bad_eps)]);
    let e = check(&lib.load("tiny").expect("load")).expect_err("negative eps");
    assert!(e.to_string().contains("l2_normalize"), "{e}");

    let layout =
        "    - moveaxis: {match: \"l.{i}.conv\", from: 2, to: 1, if_shape: \"shape[2] != 1\"}
    - add: {match: \"l.{i}.norm\", value: 1.0, if_present: \"l.{i}.experts.{e}\"}
    - split: {match: \"l.{i}.gate_up\", axis: 1, to: [\"l.{i}.gate\", \"l.{i}.up\"]}
    - fp8: {match: \"{m*}.weight\", scale: \"{m*}.weight_scale_inv\"}
    - ternary: {match: \"{t*}.proj.weight\", scale: \"{t*}.proj.weight_scale\"}
";
    let good = format!("{SPLIT}{rules}{layout}");
    let (_dir, lib) = library_with(&[("tiny.yaml", &good)]);
    check(&lib.load("tiny").expect("load")).expect("the layout rules check");
    for (from, to, want) in [
        ("shape[2] != 1", "d > 1", "unknown name 'd'"),
        ("value: 1.0", "value: .inf", "not a finite number"),
        (
            "if_present: \"l.{i}.experts.{e}\"",
            "if_present: \"l.{i\"",
            "add",
        ),
        (
            "[\"l.{i}.gate\", \"l.{i}.up\"]",
            "[\"l.{j}.gate\", \"l.{i}.up\"]",
            "capture 'j'",
        ),
        (
            "[\"l.{i}.gate\", \"l.{i}.up\"]",
            "[\"l.{i}.gate\"]",
            "at least 2",
        ),
        (
            "scale: \"{m*}.weight_scale_inv\"",
            "scale: \"{n*}.s\"",
            "capture 'n'",
        ),
        (
            "scale: \"{t*}.proj.weight_scale\"",
            "scale: \"{u*}.proj.weight_scale\"",
            "capture 'u'",
        ),
    ] {
        let text = good.replace(from, to);
        let (_dir, lib) = library_with(&[("tiny.yaml", &text)]);
        let e = check(&lib.load("tiny").expect("load"))
            .expect_err(to)
            .to_string();
        assert!(e.contains(want) && e.contains("weights.rules"), "{to}: {e}");
    }
}

/// One `model_type`, several tasks: each loader gets the spec of its task,
/// else the other claims (the `generate` one first); two claims of one
/// type for one task are an error naming the file and the task.
#[test]
fn specs_of_different_tasks_share_a_model_type() {
    use lmspec_spec::raw::Task;
    let lib = SpecLibrary::open(&root().join("specs")).expect("library");
    let file = Path::new("config.json");
    let name = |mt: &str, task: Task| lib.for_model_type_task(mt, task, file).expect(mt).name;
    assert_eq!(name("qwen3", Task::Generate), "qwen3");
    assert_eq!(name("qwen3", Task::Embed), "qwen3_embed");
    assert_eq!(name("qwen3", Task::Classify), "qwen3");
    assert_eq!(name("gemma3_text", Task::Embed), "gemma3_embed");
    assert_eq!(name("xlm-roberta", Task::Classify), "roberta_rerank");
    assert_eq!(name("xlm-roberta", Task::Embed), "roberta");
    assert_eq!(name("roberta", Task::Generate), "roberta");
    assert_eq!(lib.for_model_type("bert", file).expect("bert").name, "bert");
    let types = lib.model_types();
    let qwen3: Vec<&(String, String)> = types.iter().filter(|(m, _)| m == "qwen3").collect();
    assert_eq!(qwen3, [&("qwen3".to_string(), "qwen3".to_string())]);

    const A: &str = "spec_version: 1\nname: a\nmodel_types: [t]\ntask: embed\nmodel:\n  inputs: [tokens]\n  nodes:\n    e: {op: embedding, in: tokens, weight: e, vocab: 4, dim: 2}\n  output: e\n";
    let b = A.replace("name: a", "name: b");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("models")).expect("mkdir");
    std::fs::write(dir.path().join("models/a.yaml"), A).expect("write");
    std::fs::write(dir.path().join("models/b.yaml"), &b).expect("write");
    let err = SpecLibrary::open(dir.path()).expect_err("claimed twice");
    assert!(
        err.to_string()
            .contains("model_type 't' is already claimed by spec 'a' for task 'embed'"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("models/b.yaml"),
        b.replace("task: embed", "task: classify"),
    )
    .expect("write");
    assert!(SpecLibrary::open(dir.path()).is_ok());
    std::fs::write(
        dir.path().join("models/b.yaml"),
        b.replace("task: embed", "task: pool"),
    )
    .expect("write");
    let err = SpecLibrary::open(dir.path()).expect_err("unknown task");
    assert!(
        err.to_string().contains("b.yaml") && err.to_string().contains("pool"),
        "{err}"
    );
}

const LOOPED: &str = "spec_version: 1
name: looped
model_types: [looped]
config:
  n: {type: int, value: 2}
  loops: {type: int, value: 3}
layers:
  count: n * loops
  prefix: PREFIX
  block: layer
blocks:
  layer:
    inputs: [x]
    nodes:
      norm: {op: rms_norm, in: x, weight: norm, eps: 1e-5}
      top: {op: rms_norm, in: norm, weight: /model.norm, eps: 1e-5}
    output: top
model:
  inputs: [tokens]
  nodes:
    embed: {op: embedding, in: tokens, weight: emb, vocab: 10, dim: 4}
    layers: {op: layers, in: embed}
  output: layers
";

#[test]
fn layer_prefixes_are_expressions_and_weights_can_be_absolute() {
    let text = LOOPED.replace("PREFIX", "\"blocks.{i % n}.loop{i // n}\"");
    let (_dir, lib) = library_with(&[("looped.yaml", &text)]);
    let spec = lib.load("looped").expect("load");
    let (_, g) =
        expand_for(&spec, &serde_json::json!({}), Path::new("config.json")).expect("expand");
    let dump = render::dump(&g, false);
    // Layer 5 is the second layer of the third loop.
    assert!(
        dump.contains("    blocks.1.loop2.norm.weight [4]"),
        "{dump}"
    );
    assert!(
        dump.contains("    blocks.0.loop0.norm.weight [4]"),
        "{dump}"
    );
    // An absolute name ignores the layer's scope.
    assert!(dump.contains("\n    model.norm.weight [4]"), "{dump}");
    assert!(!dump.contains("loop0.model.norm"), "{dump}");
    for (prefix, want) in [
        ("\"blocks.{i %}\"", "prefix"),
        ("\"blocks.{i\"", "without its '}'"),
        ("\"blocks.}{i}\"", "without its '{'"),
        ("\"blocks.{j}\"", "unknown name 'j'"),
    ] {
        let text = LOOPED.replace("PREFIX", prefix);
        let (_dir, lib) = library_with(&[("looped.yaml", &text)]);
        let err = match lib.load("looped").and_then(|s| check(&s)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{prefix} accepted"),
        };
        assert!(
            err.contains("layers: prefix") && err.contains(want),
            "{prefix}: {err}"
        );
    }
    let text = LOOPED.replace("PREFIX", "\"blocks.{n > 1}\"");
    let (_dir, lib) = library_with(&[("looped.yaml", &text)]);
    let spec = lib.load("looped").expect("load");
    let err = expand_for(&spec, &serde_json::json!({}), Path::new("config.json"))
        .expect_err("a bool is not a scope part")
        .to_string();
    assert!(err.contains("not an int or a string"), "{err}");
}

const SHARDED: &str = "spec_version: 1
name: sharded
model_types: [sharded]
parallel:
  split: [heads, widths, absent]
  split_or_copy: [kv]
config:
  heads: {type: int, from: heads}
  kv: {type: int, from: kv}
  widths: {type: list, value: [8, 16]}
  absent: {type: int, value: null}
  head_dim: {type: int, value: 64 // heads}
model:
  inputs: [tokens]
  nodes:
    embed: {op: embedding, in: tokens, weight: emb, vocab: 10, dim: 64}
    q: {op: linear, in: embed, weight: q, out: heads * head_dim, shard: out}
    k: {op: linear, in: embed, weight: k, out: kv * head_dim, shard: out}
    o: {op: linear, in: q, weight: o, out: 64, shard: in}
  output: o
";

#[test]
fn parallel_entries_hold_each_ranks_share() {
    let (_dir, lib) = library_with(&[("sharded.yaml", SHARDED)]);
    let spec = lib.load("sharded").expect("loads");
    let config = serde_json::json!({"model_type": "sharded", "heads": 4, "kv": 2});
    let file = Path::new("config.json");
    let ints = |v: &[i64]| Value::List(v.iter().map(|&x| Value::Int(x)).collect());
    // One rank: nothing changes.
    let (bound, graph) = lmspec_spec::expand_for_ranks(&spec, &config, file, 1).expect("one");
    assert_eq!(graph.nodes[1].resolved.weights[0].shape, vec![64, 64]);
    assert!(bound["widths"] == ints(&[8, 16]));
    // Two ranks: heads and every list entry halved, head_dim (computed
    // from the whole model's heads) kept, null kept.
    let (bound, graph) = lmspec_spec::expand_for_ranks(&spec, &config, file, 2).expect("two");
    let shape = |k: usize| graph.nodes[k].resolved.weights[0].shape.clone();
    assert_eq!(
        (shape(1), shape(2), shape(3)),
        (vec![32, 64], vec![16, 64], vec![64, 32])
    );
    assert!(bound["head_dim"] == Value::Int(16));
    assert!(bound["absent"] == Value::Null);
    assert!(bound["widths"] == ints(&[4, 8]));
    // The o weight's input axis is the rank's slice; q/k may be copied,
    // o may not.
    let req = |k: usize| graph.nodes[k].resolved.weights[0].clone();
    assert_eq!((req(1).shard_axis, req(1).shard_copies), (Some(0), true));
    assert_eq!((req(3).shard_axis, req(3).shard_copies), (Some(1), false));
    // Four ranks: two key/value heads become one copied head per rank.
    let (bound, _) = lmspec_spec::expand_for_ranks(&spec, &config, file, 4).expect("four");
    assert!(bound["kv"] == Value::Int(1));
    // Three ranks do not split four heads: the checkpoint key is blamed.
    let err = lmspec_spec::expand_for_ranks(&spec, &config, file, 3)
        .expect_err("three")
        .to_string();
    assert!(
        err.contains("config.json: heads")
            && err.contains("heads = 4 cannot be split over 3 ranks"),
        "{err}"
    );
    // Eight ranks could copy the key/value heads but not split 4 query heads.
    let err = lmspec_spec::expand_for_ranks(&spec, &config, file, 8)
        .expect_err("eight")
        .to_string();
    assert!(
        err.contains("heads = 4 cannot be split over 8 ranks"),
        "{err}"
    );
    // An entry that is not in the config is named.
    let bad = SHARDED.replace("split: [heads, widths, absent]", "split: [heads, nowhere]");
    let (_dir, lib) = library_with(&[("sharded.yaml", &bad)]);
    let spec = lib.load("sharded").expect("loads");
    let err = lmspec_spec::expand_for_ranks(&spec, &config, file, 2)
        .expect_err("unknown")
        .to_string();
    assert!(
        err.contains("parallel: nowhere: 'nowhere' is not a config entry"),
        "{err}"
    );
    // A spec without `parallel` runs on one rank only.
    let none = SHARDED.replace(
        "parallel:\n  split: [heads, widths, absent]\n  split_or_copy: [kv]\n",
        "",
    );
    let (_dir, lib) = library_with(&[("sharded.yaml", &none)]);
    let spec = lib.load("sharded").expect("loads");
    let err = lmspec_spec::expand_for_ranks(&spec, &config, file, 2)
        .expect_err("no parallel")
        .to_string();
    assert!(err.contains("declares no tensor parallelism"), "{err}");
}
