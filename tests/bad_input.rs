//! Bad input gives an error naming the file, the node and the field, never
//! a panic: one test per kind of bad input.
use std::fs;
use std::path::{Path, PathBuf};

use lmspec::engine::{Error, SpecLibrary};
use tempfile::TempDir;

use crate::support::{goldens, mlx_lock, root};

/// A spec library in a temp dir: the real shared blocks plus `models`.
fn library_with(models: &[(&str, &str)]) -> (TempDir, SpecLibrary) {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(dir.path().join("blocks")).expect("mkdir");
    fs::create_dir_all(dir.path().join("models")).expect("mkdir");
    for entry in fs::read_dir(root().join("specs/blocks")).expect("blocks") {
        let p = entry.expect("entry").path();
        fs::copy(
            &p,
            dir.path().join("blocks").join(p.file_name().expect("name")),
        )
        .expect("copy");
    }
    for entry in fs::read_dir(root().join("specs/models")).expect("models") {
        let p = entry.expect("entry").path();
        fs::copy(
            &p,
            dir.path().join("models").join(p.file_name().expect("name")),
        )
        .expect("copy");
    }
    for (name, text) in models {
        fs::write(dir.path().join("models").join(format!("{name}.yaml")), text).expect("write");
    }
    let lib = SpecLibrary::open(dir.path());
    (dir, lib.expect("library opens"))
}

/// A copy of a golden model directory with `edit` applied to its config.
fn model_copy(case: &str, edit: impl FnOnce(&mut serde_json::Value)) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = goldens().join(case).join("model");
    for entry in fs::read_dir(&src).expect("model dir") {
        let p = entry.expect("entry").path();
        fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
    }
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&cfg_path).expect("read")).expect("json");
    edit(&mut cfg);
    fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).expect("ser")).expect("write");
    let path = dir.path().to_path_buf();
    (dir, path)
}

fn spec_error(lib: &SpecLibrary, name: &str) -> (PathBuf, String, String, String) {
    let err = lib
        .load(name)
        .and_then(|s| lmspec::spec::check(&s).map(|_| ()))
        .map_err(Error::from)
        .expect_err("the spec is invalid");
    match err {
        Error::Spec {
            file,
            node,
            field,
            msg,
        } => (file, node, field, msg),
        other => panic!("expected a spec error, got {other:?}"),
    }
}

const LLAMA_LIKE: &str = "spec_version: 1\nextends: llama\nmodel_types: [bad]\n";

#[test]
fn malformed_yaml_names_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(dir.path().join("models")).expect("mkdir");
    let file = dir.path().join("models/broken.yaml");
    fs::write(&file, "spec_version: 1\nconfig:\n  hidden_size: [int\n").expect("write");
    match SpecLibrary::open(dir.path())
        .map_err(Error::from)
        .expect_err("malformed")
    {
        Error::Spec {
            file: f,
            node,
            field,
            ..
        } => {
            assert_eq!(f, file);
            assert!(node.starts_with("line "), "{node}");
            assert_eq!(field, "yaml");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_primitive() {
    let text = format!(
        "{LLAMA_LIKE}blocks:\n  mlp:\n    inputs: [x]\n    nodes:\n      up: {{op: frobnicate, in: x}}\n    output: up\n"
    );
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (file, node, field, msg) = spec_error(&lib, "bad");
    assert!(file.ends_with("models/bad.yaml"), "{file:?}");
    assert_eq!(node, "blocks.mlp.nodes.up");
    assert_eq!(field, "op");
    assert!(
        msg.contains("unknown primitive 'frobnicate'") && msg.contains("linear"),
        "{msg}"
    );
}

#[test]
fn dangling_value_name() {
    let text = format!(
        "{LLAMA_LIKE}blocks:\n  mlp:\n    inputs: [x]\n    nodes:\n      up: {{op: linear, in: nowhere, weight: up_proj, out: hidden_size}}\n    output: up\n"
    );
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (_, node, field, msg) = spec_error(&lib, "bad");
    assert_eq!(
        (node.as_str(), field.as_str()),
        ("blocks.mlp.nodes.up", "in")
    );
    assert!(msg.contains("unknown value 'nowhere'"), "{msg}");
}

#[test]
fn cycle_between_nodes() {
    let text = format!(
        "{LLAMA_LIKE}blocks:\n  mlp:\n    inputs: [x]\n    nodes:\n      a: {{op: add, in: [x, b]}}\n      b: {{op: add, in: [x, a]}}\n    output: b\n"
    );
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (_, node, field, msg) = spec_error(&lib, "bad");
    assert!(node.starts_with("blocks.mlp.nodes."), "{node}");
    assert_eq!(field, "in");
    assert!(msg.contains("cycle"), "{msg}");
}

#[test]
fn unknown_parameter_and_unknown_config_name() {
    let text = format!(
        "{LLAMA_LIKE}blocks:\n  mlp:\n    inputs: [x]\n    nodes:\n      up: {{op: linear, in: x, weight: up_proj, out: hiden_size}}\n    output: up\n"
    );
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (_, _, field, msg) = spec_error(&lib, "bad");
    assert_eq!(field, "out");
    assert!(msg.contains("unknown name 'hiden_size'"), "{msg}");

    let text = format!(
        "{LLAMA_LIKE}blocks:\n  mlp:\n    inputs: [x]\n    nodes:\n      up: {{op: linear, in: x, weight: up_proj, out: hidden_size, colour: red}}\n    output: up\n"
    );
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (_, _, field, msg) = spec_error(&lib, "bad");
    assert_eq!(field, "colour");
    assert!(msg.contains("no parameter 'colour'"), "{msg}");
}

fn weights_error(model: &Path, lib: &SpecLibrary, spec: Option<&str>) -> (PathBuf, String) {
    let _guard = mlx_lock();
    match crate::support::load_model(model, lib, spec).expect_err("load fails") {
        Error::Weights { file, msg } => (file, msg),
        other => panic!("expected a weights error, got {other}"),
    }
}

#[test]
fn missing_weight_names_tensor_node_and_field() {
    let text = format!("{LLAMA_LIKE}config:\n  qk_norm: {{type: bool, value: true}}\n");
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (_m, model) = model_copy("llama", |_| {});
    let (file, msg) = weights_error(&model, &lib, Some("bad"));
    assert!(file.ends_with("model.safetensors"), "{file:?}");
    assert!(msg.contains("missing"), "{msg}");
    assert!(
        msg.contains("model.layers.0.self_attn.q_norm.weight needed by node layers.0.attn.q_norm (field weight of blocks.attention.nodes.q_norm"),
        "{msg}"
    );
}

#[test]
fn unused_checkpoint_weight_is_listed() {
    let lib = crate::support::library();
    let (_m, model) = model_copy("qwen3", |_| {});
    let (_, msg) = weights_error(&model, &lib, Some("llama"));
    assert!(msg.contains("not used by the spec"), "{msg}");
    assert!(
        msg.contains("model.layers.0.self_attn.k_norm.weight"),
        "{msg}"
    );
}

#[test]
fn shape_mismatch_names_node_and_field() {
    let lib = crate::support::library();
    let (_m, model) = model_copy("llama", |c| c["intermediate_size"] = 96.into());
    let (_, msg) = weights_error(&model, &lib, None);
    assert!(msg.contains("shape mismatch"), "{msg}");
    assert!(
        msg.contains("[128, 64]") && msg.contains("[96, 64]"),
        "{msg}"
    );
    assert!(
        msg.contains("node layers.0.mlp.gate (field weight"),
        "{msg}"
    );
}

#[test]
fn unknown_model_type_lists_known_ones() {
    let lib = crate::support::library();
    let (_m, model) = model_copy("llama", |c| c["model_type"] = "nope".into());
    let _guard = mlx_lock();
    match crate::support::load_model(&model, &lib, None).expect_err("unknown type") {
        Error::UnknownModelType {
            file,
            model_type,
            known,
        } => {
            assert!(file.ends_with("config.json"));
            assert_eq!(model_type, "nope");
            assert!(known.contains(&"llama".to_string()) && known.contains(&"qwen3".to_string()));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn missing_config_key_without_default() {
    let lib = crate::support::library();
    let (_m, model) = model_copy("llama", |c| {
        c.as_object_mut().expect("object").remove("hidden_size");
    });
    let _guard = mlx_lock();
    match crate::support::load_model(&model, &lib, None).expect_err("missing key") {
        Error::Config { file, key, msg } => {
            assert!(file.ends_with("config.json"));
            assert_eq!(key, "hidden_size");
            assert!(msg.contains("no default"), "{msg}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn config_value_of_wrong_type() {
    let lib = crate::support::library();
    let (_m, model) = model_copy("llama", |c| c["num_attention_heads"] = "four".into());
    let _guard = mlx_lock();
    match crate::support::load_model(&model, &lib, None).expect_err("bad type") {
        Error::Config { key, msg, .. } => {
            assert_eq!(key, "num_attention_heads");
            assert!(msg.contains("expected dim"), "{msg}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn heads_that_do_not_group_are_blamed_on_the_config_at_the_node() {
    let lib = crate::support::library();
    let (_m, model) = model_copy("llama", |c| c["num_key_value_heads"] = 3.into());
    let _guard = mlx_lock();
    match crate::support::load_model(&model, &lib, None).expect_err("bad heads") {
        Error::Config { file, key, msg } => {
            assert!(file.ends_with("config.json"), "{file:?}");
            assert!(key.contains("num_key_value_heads"), "{key}");
            assert!(msg.contains("num_key_value_heads = 3"), "{msg}");
            assert!(msg.contains("blocks.attention.nodes.attn: in:"), "{msg}");
            assert!(msg.contains("4 query heads do not group over 3"), "{msg}");
            assert!(msg.contains("at layers.0.attn.attn"), "{msg}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_head_size_that_does_not_divide_the_width_is_blamed_on_the_config_at_the_node() {
    let lib = crate::support::library();
    let (_m, model) = model_copy("rwkv7", |c| c["head_dim"] = 24.into());
    let _guard = mlx_lock();
    match crate::support::load_model(&model, &lib, None).expect_err("bad head size") {
        Error::Config { file, key, msg } => {
            assert!(file.ends_with("config.json"), "{file:?}");
            assert!(key.contains("head_dim"), "{key}");
            assert!(msg.contains("head_dim = 24"), "{msg}");
            assert!(
                msg.contains("blocks.rwkv7_time_mix.nodes.core: in:"),
                "{msg}"
            );
            assert!(msg.contains("input 0 (r) is 64 wide; expected 48"), "{msg}");
            assert!(msg.contains("at layers.0.attn.core"), "{msg}");
        }
        other => panic!("{other}"),
    }
}

/// The spec error (node, field, message) of loading the llama golden model
/// with a spec `bad` that extends llama by `extra`.
fn llama_spec_error(extra: &str) -> (String, String, String) {
    let text = format!("{LLAMA_LIKE}{extra}");
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (_m, model) = model_copy("llama", |_| {});
    let _guard = mlx_lock();
    match crate::support::load_model(&model, &lib, Some("bad")).expect_err("invalid spec") {
        Error::Spec {
            file,
            node,
            field,
            msg,
        } => {
            assert!(file.extension().is_some_and(|e| e == "yaml"), "{file:?}");
            (node, field, msg)
        }
        other => panic!("expected a spec error, got {other}"),
    }
}

#[test]
fn config_entries_reading_each_other_are_a_cycle() {
    let (node, field, msg) =
        llama_spec_error("config:\n  a: {type: int, value: b}\n  b: {type: int, value: a + 1}\n");
    assert_eq!((node.as_str(), field.as_str()), ("config.a", "value"));
    assert!(msg.contains("cycle"), "{msg}");
}

#[test]
fn per_layer_entry_with_a_value_and_i_outside_per_layer() {
    let (node, field, msg) =
        llama_spec_error("config:\n  w: {type: int, value: 1, per_layer: i}\n");
    assert_eq!((node.as_str(), field.as_str()), ("config.w", "per_layer"));
    assert!(msg.contains("takes no value"), "{msg}");
    let (node, _, msg) = llama_spec_error("config:\n  w: {type: int, value: i + 1}\n");
    assert_eq!(node, "config.w");
    assert!(msg.contains("only `per_layer` entries"), "{msg}");
}

#[test]
fn slice_outside_the_axis_names_node_and_field() {
    let (node, field, msg) = llama_spec_error(
        "model:\n  nodes:\n    embed: {op: embedding, in: tokens, weight: model.embed_tokens, vocab: vocab_size, dim: hidden_size}\n    part: {op: slice, in: embed, start: 60, size: 8}\n  output: part\n",
    );
    assert_eq!(
        (node.as_str(), field.as_str()),
        ("model.nodes.part", "size")
    );
    assert!(
        msg.contains("8 entries from 60 are not inside the 64"),
        "{msg}"
    );
}

#[test]
fn else_without_when_and_unknown_choice_value() {
    let (node, field, _) = llama_spec_error(
        "blocks:\n  mlp:\n    inputs: [x]\n    nodes:\n      up: {op: linear, in: x, weight: up_proj, out: hidden_size, else: x}\n    output: up\n",
    );
    assert_eq!(
        (node.as_str(), field.as_str()),
        ("blocks.mlp.nodes.up", "else")
    );
    let (node, field, msg) = llama_spec_error("config:\n  mlp_act: {type: str, value: swish}\n");
    assert_eq!(
        (node.as_str(), field.as_str()),
        ("blocks.mlp.nodes.act", "fn")
    );
    assert!(
        msg.contains("swish") && msg.contains("gelu_approx"),
        "{msg}"
    );
}

#[test]
fn attention_softcap_and_window_must_be_positive() {
    let (node, field, msg) =
        llama_spec_error("config:\n  attn_softcap: {type: float, value: 0.0}\n");
    assert_eq!(
        (node.as_str(), field.as_str()),
        ("blocks.attention.nodes.attn", "softcap")
    );
    assert!(msg.contains("0 is not positive"), "{msg}");
    let (_, field, _) = llama_spec_error("config:\n  attn_window: {type: int, value: 0}\n");
    assert_eq!(field, "window");
}

#[test]
fn transpose_rule_on_a_vector_is_a_weights_error() {
    let text = format!("{LLAMA_LIKE}weights:\n  rules:\n    - transpose: \"model.norm.weight\"\n");
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (_m, model) = model_copy("llama", |_| {});
    let (_, msg) = weights_error(&model, &lib, Some("bad"));
    assert!(
        msg.contains("transpose: tensor has 1 axes") && msg.contains("model.norm.weight"),
        "{msg}"
    );
}

#[test]
fn embedder_pooling_config_errors_name_the_file() {
    let src = lmspec::default_embedder().expect("embedder installed");
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in fs::read_dir(&src).expect("model dir") {
        let p = entry.expect("entry").path();
        if p.file_name().is_some_and(|n| n != "1_Pooling") {
            std::os::unix::fs::symlink(&p, dir.path().join(p.file_name().expect("name")))
                .expect("link");
        }
    }
    let pooling = dir.path().join("1_Pooling");
    fs::create_dir_all(&pooling).expect("mkdir");
    fs::write(
        pooling.join("config.json"),
        r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true}"#,
    )
    .expect("write");
    let lib = crate::support::library();
    let _guard = mlx_lock();
    match lmspec::lm::Embedder::load(dir.path(), &crate::support::opts(&lib, None))
        .expect_err("two modes")
    {
        Error::Config { file, key, msg } => {
            assert!(file.ends_with("1_Pooling/config.json"), "{file:?}");
            assert!(key.starts_with("pooling_mode_"), "{key}");
            assert!(msg.contains("more than one pooling mode"), "{msg}");
        }
        other => panic!("{other}"),
    }
    fs::write(pooling.join("config.json"), "{not json").expect("write");
    let err = lmspec::lm::Embedder::load(dir.path(), &crate::support::opts(&lib, None))
        .expect_err("bad JSON");
    assert!(err.to_string().contains("invalid JSON"), "{err}");
}

#[test]
fn stack_rule_index_must_be_a_capture() {
    let (node, field, msg) = llama_spec_error(
        "weights:\n  rules:\n    - stack: {from: \"model.layers.{i}.mlp.experts.{e}.{m}.{s}\", to: \"model.layers.{i}.mlp.switch_mlp.{m}.{s}\", index: x}\n",
    );
    assert_eq!((node.as_str(), field.as_str()), ("weights.rules", "stack"));
    assert!(msg.contains("index 'x' is not a capture"), "{msg}");
}

#[test]
fn moe_top_k_beyond_the_experts_names_node_and_field() {
    let (_m, model) = model_copy("qwen3_moe", |c| c["num_experts_per_tok"] = 9.into());
    let _guard = mlx_lock();
    match crate::support::load_model(&model, &crate::support::library(), None)
        .expect_err("top_k > experts")
    {
        // The checkpoint's value is at fault: the error names the config
        // key, then the spec node and field that refused it.
        Error::Config { file, key, msg } => {
            assert!(file.ends_with("config.json"), "{file:?}");
            assert_eq!(key, "num_experts_per_tok");
            assert!(
                msg.contains("specs/blocks/moe.yaml: blocks.sparse_moe.nodes.routed: top_k:"),
                "{msg}"
            );
            assert!(
                msg.contains("top_k 9 must be between 1 and num_experts 4"),
                "{msg}"
            );
        }
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn a_key_the_spec_supports_with_one_value_only_is_refused_by_name() {
    let text = format!("{LLAMA_LIKE}config_keys:\n  only:\n    frobnicate: false\n");
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (_m, model) = model_copy("llama", |c| c["frobnicate"] = true.into());
    let _guard = mlx_lock();
    match crate::support::load_model(&model, &lib, Some("bad")).expect_err("unsupported value") {
        Error::Config { file, key, msg } => {
            assert!(file.ends_with("config.json"), "{file:?}");
            assert_eq!(key, "frobnicate");
            assert!(msg.contains("true is not supported by spec 'bad'"), "{msg}");
            assert!(msg.contains("only false is"), "{msg}");
        }
        other => panic!("{other}"),
    }
    // The supported value (and its absence) load.
    let (_m, model) = model_copy("llama", |c| c["frobnicate"] = false.into());
    crate::support::load_model(&model, &lib, Some("bad")).expect("the supported value loads");
}

/// A rotating cache (`max_kv_size`) under attention within local chunks,
/// which reads every position of a chunk: an error naming the node, not
/// wrong values.
#[test]
fn rotating_cache_under_local_chunks_names_the_node() {
    let _guard = mlx_lock();
    let model = crate::support::load_model(
        &goldens().join("llama4/model"),
        &crate::support::library(),
        None,
    )
    .expect("llama4");
    let mut cache = model.new_cache_with(lmspec::engine::cache::CacheOptions {
        max_kv_size: Some(8),
    });
    let tokens = mlx_rs::Array::from_slice(&[1i32, 2, 3], &[1, 3]);
    let err = model
        .forward(&tokens, Some(&mut cache))
        .expect_err("a rotating cache");
    let msg = err.to_string();
    assert!(msg.starts_with("layers.0.attn"), "{msg}");
    assert!(msg.contains("max_kv_size"), "{msg}");
}

/// A Hadamard pack's manifest that disagrees with its tensors, or a pack
/// quantized otherwise: errors naming the file and the module.
#[test]
fn a_hadamard_manifest_that_disagrees_with_the_checkpoint_names_the_module() {
    let lib = crate::support::library();
    let record = |c: &mut serde_json::Value, path: &str| -> serde_json::Value {
        let modules = c["modules"].as_array().expect("modules").clone();
        modules
            .into_iter()
            .find(|m| m["path"] == path)
            .expect("a record")
    };
    // A rotated module marked as not rotated (block 0).
    let qkv = "model.layers.0.linear_attn.in_proj_qkv";
    let (_m, model) = model_copy("prism_hadamard_qwen35", |c| {
        let mut r = record(c, qkv);
        r["block"] = 0.into();
        let modules = c["modules"].as_array_mut().expect("modules");
        modules.retain(|m| m["path"] != qkv);
        modules.push(r);
    });
    let (file, msg) = weights_error(&model, &lib, None);
    assert!(file.ends_with("model.safetensors"), "{file:?}");
    assert!(
        msg.contains(&format!(
            "'language_model.{qkv}.signs' exists but its record's block is 0"
        )),
        "{msg}"
    );
    // A block that does not divide the module's width.
    let (_m, model) = model_copy("prism_hadamard_qwen35", |c| {
        for m in c["modules"].as_array_mut().expect("modules") {
            if m["path"] == qkv {
                m["block"] = 384.into();
            }
        }
    });
    let (_, msg) = weights_error(&model, &lib, None);
    assert!(
        msg.contains("a block of 384 does not fit 512 signs") && msg.contains(qkv),
        "{msg}"
    );
    // A record for a module the checkpoint does not rotate.
    let (_m, model) = model_copy("prism_hadamard_qwen35", |c| {
        for m in c["modules"].as_array_mut().expect("modules") {
            if m["path"] == "model.layers.0.linear_attn.out_proj" {
                m["block"] = 128.into();
            }
        }
    });
    let (_, msg) = weights_error(&model, &lib, None);
    assert!(
        msg.contains("rotates 'language_model.model.layers.0.linear_attn.out_proj.signs' in blocks of 128 but the checkpoint has no such tensor"),
        "{msg}"
    );
    // Another quantization than the packs' 2-bit, group 128 affine.
    let (_m, model) = model_copy("prism_hadamard_qwen35", |c| {
        c["quantization"]["bits"] = 4.into();
    });
    let _guard = mlx_lock();
    match crate::support::load_model(&model, &lib, None).expect_err("refused") {
        Error::Config { key, msg, .. } => {
            assert_eq!(key, "quantization");
            assert!(
                msg.contains("is not supported by spec 'prism_hadamard_qwen35'"),
                "{msg}"
            );
        }
        other => panic!("{other}"),
    }
}

/// An attention node's fourth input must be an index_topk node's keep
/// mask; the indexer's inputs must fit one another.
#[test]
fn attention_keep_masks_come_from_index_topk_nodes() {
    let model = |k_heads: &str, keep_from: &str| {
        format!(
            "model:\n  nodes:\n    embed: {{op: embedding, in: tokens, weight: model.embed_tokens, vocab: vocab_size, dim: hidden_size}}\n    q: {{op: split_heads, in: embed, heads: 4}}\n    kk: {{op: slice, in: embed, size: 16}}\n    k: {{op: split_heads, in: kk, heads: {k_heads}}}\n    w: {{op: slice, in: embed, size: 4}}\n    keep: {{op: index_topk, in: [q, k, w], topk: 2, scale: 1.0}}\n    attn: {{op: attention, in: [q, q, q, {keep_from}], scale: 0.25}}\n    out: {{op: merge_heads, in: attn}}\n  output: out\n"
        )
    };
    // The nodes' widths follow the config, so the errors name it too.
    let error = |text: String| llama_load_error(&text);
    let msg = error(model("1", "q"));
    assert!(
        msg.contains("bad.yaml: model.nodes.attn: in: the fourth input is a keep mask"),
        "{msg}"
    );
    // Index keys of another size than the queries'.
    let msg = error(model("2", "keep"));
    assert!(
        msg.contains("model.nodes.keep: in: k must be one head of q's size 16, got 2 of 8"),
        "{msg}"
    );
}

/// AltUp's streams that do not fill the value, a sparsity outside (0, 1)
/// and an `outside` row past the table: errors naming the node and field.
#[test]
fn altup_streams_sparsity_and_outside_rows_are_checked_at_the_node() {
    let error = |nodes: &str| {
        llama_load_error(&format!(
            "model:\n  nodes:\n    embed: {{op: embedding, in: tokens, weight: model.embed_tokens, vocab: vocab_size, dim: hidden_size}}\n{nodes}"
        ))
    };
    let msg = error("    pred: {op: altup_predict, in: embed, weight: altup, streams: 3, dim: 16}\n  output: pred\n");
    assert!(
        msg.contains("model.nodes.pred: in: the streams are 64 wide; 3 streams of 16 are 48"),
        "{msg}"
    );
    let msg = error("    cut: {op: gelu_topk, in: embed, sparsity: 1.5}\n  output: cut\n");
    assert!(
        msg.contains("model.nodes.cut: sparsity: 1.5 is not between 0 and 1"),
        "{msg}"
    );
    let msg = error("    pl: {op: embedding, in: tokens, weight: model.embed_tokens, vocab: 256, dim: 64, outside: 300}\n  output: pl\n");
    assert!(
        msg.contains("model.nodes.pl: outside: row 300 is not one of the table's 256"),
        "{msg}"
    );
}

/// A block indexer whose key is not one head of the queries' size, or
/// whose local blocks are negative: errors naming the node and field.
#[test]
fn block_indexer_inputs_and_local_blocks_are_checked_at_the_node() {
    let error = |keep: &str| {
        llama_load_error(&format!(
            "model:\n  nodes:\n    embed: {{op: embedding, in: tokens, weight: model.embed_tokens, vocab: vocab_size, dim: hidden_size}}\n    q: {{op: split_heads, in: embed, heads: 4}}\n    kk: {{op: slice, in: embed, size: 16}}\n    k: {{op: split_heads, in: kk, heads: 1}}\n    k2: {{op: split_heads, in: embed, heads: 4}}\n    keep: {keep}\n  output: keep\n"
        ))
    };
    let msg = error("{op: block_topk, in: [q, k2], block_size: 2, topk: 2}");
    assert!(
        msg.contains("model.nodes.keep: in: k must be one head of q's size 16, got 4 of 16"),
        "{msg}"
    );
    let msg = error("{op: block_topk, in: [q, k], block_size: 2, topk: 2, local: -1}");
    assert!(
        msg.contains("model.nodes.keep: local: -1 is not 0 or more"),
        "{msg}"
    );
}

/// The error (as text) of loading the llama golden model with a spec `bad`
/// that extends llama by `extra` (nodes whose widths follow the config,
/// so the error names the config too).
fn llama_load_error(extra: &str) -> String {
    let text = format!("{LLAMA_LIKE}{extra}");
    let (_d, lib) = library_with(&[("bad", &text)]);
    let (_m, model) = model_copy("llama", |_| {});
    let _guard = mlx_lock();
    let e = crate::support::load_model(&model, &lib, Some("bad")).expect_err("refused");
    e.to_string()
}
