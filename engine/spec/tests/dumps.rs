//! The expanded graph of every golden case's config, pinned: a change in
//! checking, expansion or any op's resolution shows up here as a diff, with
//! no MLX and no weights.
use std::path::{Path, PathBuf};

use lmspec_spec::{expand_for, render, SpecLibrary};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dump(case: &str) -> String {
    let lib = SpecLibrary::open(&root().join("specs")).expect("spec library");
    let file = root().join("goldens").join(case).join("model/config.json");
    let text = std::fs::read_to_string(&file).expect("config.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let model_type = json["model_type"].as_str().expect("model_type");
    let spec = lib.for_model_type(model_type, &file).expect("spec");
    let (_, graph) = expand_for(&spec, &json, &file).expect("expand");
    render::dump(&graph, false)
}

macro_rules! dump_tests {
    ($($case:ident),+ $(,)?) => {$(
        #[test]
        fn $case() {
            insta::assert_snapshot!(dump(stringify!($case)));
        }
    )+};
}

dump_tests!(
    cohere,
    cohere_ln_bias,
    cohere_qk_norm,
    deepseek_v2,
    deepseek_v2_group_overflow,
    deepseek_v3,
    deepseek_v3_q4,
    gemma,
    gemma2,
    gemma3_text,
    gemma3_text_untied,
    gpt2,
    gpt2_q4,
    gpt_neox,
    granite,
    internlm2,
    lfm2,
    llama,
    llama_hd32,
    llama_linear_rope,
    llama_q4,
    llama_rope_llama3,
    llama_sliding,
    llama_yarn,
    mamba2,
    minicpm,
    mistral,
    mixtral,
    olmo2,
    phi,
    phi3,
    phi3_longrope_traditional,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    qwen3_moe_hf,
    qwen3_moe_q4,
    qwen3_next,
    qwen3_rope_parameters,
    smollm3,
    stablelm,
    stablelm_parallel,
    stablelm_qk_layernorm,
    starcoder2,
);

/// Every case directory has a test above.
#[test]
fn every_golden_case_is_pinned() {
    let src = include_str!("dumps.rs");
    for entry in std::fs::read_dir(root().join("goldens")).expect("goldens") {
        let path = entry.expect("entry").path();
        if !path.join("golden.safetensors").is_file() {
            continue;
        }
        let name = path.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(
            src.contains(&format!("    {name},\n")),
            "goldens/{name} has no dump test"
        );
    }
}
