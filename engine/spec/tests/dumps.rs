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
    // A case without its own model names the folder it ran (meta.json).
    let dir = root().join("goldens").join(case);
    let model = if dir.join("model").is_dir() {
        dir.join("model")
    } else {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("meta.json")).expect("meta.json"),
        )
        .expect("meta json");
        root().join(meta["model_dir"].as_str().expect("model_dir"))
    };
    let file = model.join("config.json");
    let text = std::fs::read_to_string(&file).expect("config.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let model_type = json["model_type"].as_str().expect("model_type");
    let spec = lib.for_model_type(model_type, &file).expect("spec");
    let (_, graph) = expand_for(&spec, &json, &file).expect("expand");
    render::dump(&graph, false)
}

/// `test_name = "folder"` where the folder's name is not a Rust name.
macro_rules! dump_tests {
    ($($case:ident $(= $dir:literal)?),+ $(,)?) => {$(
        #[test]
        fn $case() {
            insta::assert_snapshot!(dump(dump_tests!(@dir $case $($dir)?)));
        }
    )+};
    (@dir $case:ident $dir:literal) => { $dir };
    (@dir $case:ident) => { stringify!($case) };
}

dump_tests!(
    afm7,
    afmoe,
    afmoe_q4,
    afmoe_softmax_groups,
    apertus,
    apertus_hf,
    baichuan_m1,
    bailing_hybrid,
    bailing_hybrid_6_experts,
    bailing_hybrid_bias,
    bailing_hybrid_hf_kv_b,
    bailing_moe,
    bailing_moe_linear,
    bailing_moe_linear_6_heads,
    bailing_moe_v3,
    bailing_moe_v3_hf,
    bailing_moe_v3_hf_kv_b,
    bailing_moe_q4,
    bailing_moe_sigmoid,
    bitnet,
    bitnet_hf_config,
    cohere,
    cohere2,
    cohere_ln_bias,
    cohere_qk_norm,
    dbrx,
    dbrx_hf,
    deepseek,
    deepseek_hf,
    deepseek_v2,
    deepseek_v2_group_overflow,
    deepseek_v3,
    deepseek_v3_fp8,
    deepseek_v3_hf,
    deepseek_v3_q4,
    deepseek_v32,
    dots1,
    dots1_hf,
    ernie4_5,
    ernie4_5_moe,
    ernie4_5_moe_sigmoid,
    exaone,
    exaone4,
    exaone4_global,
    exaone_moe,
    exaone_q4,
    falcon_h1,
    falcon_h1_norm_before_gate,
    falcon_h1_rms_norm,
    falcon_mamba,
    gear,
    gear_hf,
    gemma,
    gemma2,
    gemma3,
    gemma3n,
    gemma3_text,
    gemma3_text_untied,
    gemma3_untied,
    gemma4,
    gemma4_text,
    gemma4_text_k_eq_v,
    gemma4_unified,
    glm,
    glm4,
    glm4_moe,
    glm4_moe_lite,
    glm_moe_dsa,
    gpt2,
    gpt2_q4,
    gpt_bigcode,
    gpt_bigcode_mha,
    gpt_neox,
    gpt_oss,
    gpt_oss_q4,
    gptj,
    gptj_hf,
    granite,
    granitemoe,
    granitemoe_hf,
    granitemoe_q4,
    granitemoehybrid,
    granitemoehybrid_dense,
    granitemoehybrid_q4,
    helium,
    hunyuan,
    hunyuan_dense,
    hunyuan_lists,
    hunyuan_v1_dense,
    internlm2,
    internlm3,
    iquestcoder,
    iquestloopcoder,
    jamba,
    jamba_block_types,
    jamba_hf,
    joyai_llm_flash,
    kimi_linear,
    kimi_linear_hf,
    kimi_k2,
    kimi_k25,
    kimi_vl,
    klear = "Klear",
    klear_hf = "Klear_hf",
    laguna,
    lfm2,
    lfm2_hf,
    lfm2_moe,
    lfm2_vl = "lfm2-vl",
    lille_130m = "lille-130m",
    llama,
    llama4,
    llama4_hf,
    llama4_q4,
    llama4_text,
    llama_hd32,
    llama_linear_rope,
    llama_q4,
    llama_rope_llama3,
    llama_sliding,
    llama_yarn,
    llava,
    longcat_flash,
    longcat_flash_ngram,
    longcat_flash_ngram_q4,
    longcat_flash_hf,
    mamba,
    mamba_hf,
    mamba2,
    mamba2_hf,
    mamba_untied,
    mellum,
    mimo,
    mimo_v2_flash,
    minicpm,
    minicpm3,
    minimax,
    minimax_m2,
    minimax_m3_vl,
    ministral3,
    mistral,
    mistral3,
    mistral3_ministral3,
    mistral3_mistral4,
    mistral4,
    mixtral,
    muse_glimmer,
    nanbeige,
    nanbeige_loss_weights,
    nanochat,
    nemotron,
    nemotron_h,
    nemotron_h_hf,
    nemotron_h_latent,
    nemotron_h_q4,
    nemotron_nas = "nemotron-nas",
    olmo,
    olmo_tied,
    olmo2,
    olmo3,
    olmo_hybrid,
    olmo_hybrid_default_layers,
    olmo_hybrid_hf,
    olmo_hybrid_layer_count,
    olmoe,
    openelm,
    phi,
    phi3,
    phi3_longrope_traditional,
    phi3small,
    phi_msft = "phi-msft",
    phimoe,
    phimoe_longrope,
    phixtral,
    phixtral_q4,
    pixtral,
    plamo,
    plamo2,
    plamo2_hf,
    plamo3,
    plamo3_short_window,
    prism_hadamard_qwen35,
    qwen,
    qwen2,
    qwen2_5_vl,
    qwen2_moe,
    qwen2_vl,
    qwen3,
    qwen3_5,
    qwen3_5_moe,
    qwen3_5_moe_q4,
    qwen3_moe,
    qwen3_moe_hf,
    qwen3_moe_q4,
    qwen3_next,
    qwen3_next_hf,
    qwen3_rope_parameters,
    qwen3_vl,
    qwen3_vl_moe,
    qwen3_vl_moe_q4,
    recurrent_gemma,
    recurrent_gemma_hf,
    recurrent_gemma_tied,
    rwkv7,
    rwkv7_q4,
    seed_oss,
    smollm3,
    spark2_5,
    spark2_5_hf,
    stablelm,
    stablelm_parallel,
    stablelm_qk_layernorm,
    starcoder2,
    step3p5,
    step3p5_clamped,
    step3p5_tie_flag,
    step3p5_vanilla,
    talkie,
    telechat3,
    xverse,
    youtu_llm,
);

/// The vision-language golden's two graphs: the tower (`task: vision`)
/// and the text model with its splice and M-RoPE.
#[test]
fn vision_language_qwen2_vl() {
    insta::assert_snapshot!(vision_language("qwen2_vl"));
}

/// Qwen2.5-VL's: window attention (`grid_window`) in blocks 0 and 1, the
/// whole image in block 2.
#[test]
fn vision_language_qwen2_5_vl() {
    insta::assert_snapshot!(vision_language("qwen2_5_vl"));
}

/// Gemma 3's: the SigLIP tower with the pooling projector; the text model
/// splicing before its embedding scale, attention bidirectional within each
/// image's tokens.
#[test]
fn vision_language_gemma3() {
    insta::assert_snapshot!(vision_language("gemma3"));
}

/// PaliGemma's: the SigLIP tower with a linear projector; the gemma text
/// model as a prefix-LM.
#[test]
fn vision_language_paligemma() {
    insta::assert_snapshot!(vision_language("paligemma"));
}

/// Pixtral's: the Pixtral-ViT tower (2-D RoPE dealt from one ladder,
/// per-image attention, the GELU projector); the llama text model with the
/// splice.
#[test]
fn vision_language_pixtral() {
    insta::assert_snapshot!(vision_language("pixtral"));
}

/// Mistral 3's: the Pixtral tower, the RMSNorm and the channel-major 2 x 2
/// patch merger, the projector without biases.
#[test]
fn vision_language_mistral3() {
    insta::assert_snapshot!(vision_language("mistral3"));
}

/// Idefics3's: the SigLIP tower, the connector's pixel shuffle and
/// bias-free linear; the llama text model with the splice.
#[test]
fn vision_language_idefics3() {
    insta::assert_snapshot!(vision_language("idefics3"));
}

/// SmolVLM's: the same specs with a scale factor of 4.
#[test]
fn vision_language_smolvlm() {
    insta::assert_snapshot!(vision_language("smolvlm"));
}

/// Qwen3-VL's: the position table, the kept DeepStack states and their
/// mergers; the text model's interleaved M-RoPE and `add_features` after
/// layers 0 and 1.
#[test]
fn vision_language_qwen3_vl() {
    insta::assert_snapshot!(vision_language("qwen3_vl"));
}

/// Qwen3-VL-MoE's: Qwen3-VL's tower with its GELUs exchanged; the text
/// model's experts beside the M-RoPE and DeepStack nodes.
#[test]
fn vision_language_qwen3_vl_moe() {
    insta::assert_snapshot!(vision_language("qwen3_vl_moe"));
}

/// LFM2-VL's: the SigLIP2-NaFlex tower (the channels-last patch
/// embedding, the position table resized from cell centres with
/// antialiasing), the pixel unshuffle and projector; the lfm2 text model
/// with the splice.
#[test]
fn vision_language_lfm2_vl() {
    insta::assert_snapshot!(vision_language_of("lfm2_vl", "lfm2-vl"));
}

fn vision_language(case: &str) -> String {
    vision_language_of(case, case)
}

/// The dumps of the golden `case` whose checkpoint's type is `model_type`.
fn vision_language_of(case: &str, model_type: &str) -> String {
    let lib = SpecLibrary::open(&root().join("specs")).expect("spec library");
    let file = root().join(format!("goldens/vlm/{case}/model/config.json"));
    let text = std::fs::read_to_string(&file).expect("config.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut out = String::new();
    for task in [
        lmspec_spec::raw::Task::Vision,
        lmspec_spec::raw::Task::Generate,
    ] {
        let spec = lib
            .for_model_type_task(model_type, task, &file)
            .expect("spec");
        assert_eq!(spec.task, task, "{}", spec.name);
        let (_, graph) = expand_for(&spec, &json, &file).expect("expand");
        out.push_str(&format!("# {} ({})\n", spec.name, task.name()));
        out.push_str(&render::dump(&graph, false));
    }
    out
}

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
            src.contains(&format!("    {name},\n")) || src.contains(&format!("= \"{name}\",\n")),
            "goldens/{name} has no dump test"
        );
    }
}
