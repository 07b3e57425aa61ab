//! Golden regression: every case under `goldens/` against the spec that
//! claims its model_type, within the case's tolerance level.
use lmspec::port::golden::{self, Golden};

use crate::support::{goldens, library, mlx_lock};

/// Runs one case against mlx-lm's tensors and asserts it passes its level.
fn check_case(name: &str) {
    let _guard = mlx_lock();
    let case = goldens().join(name);
    let r = golden::run(&case, &crate::support::opts(&library(), None))
        .unwrap_or_else(|e| panic!("{}: {e:#}", case.display()));
    eprintln!(
        "{:<20} {:<8} {:<9} forward max_rel {:.2e} cos {:.9} | prefill/decode max_rel {:.2e} | greedy {}",
        r.case,
        r.spec,
        r.tolerance.name(),
        r.forward.max_rel(),
        r.forward.cosine,
        r.prefill_decode.max_rel(),
        if r.greedy == r.expected_greedy { "identical" } else { "DIFFERS" }
    );
    assert!(r.passed(), "golden failure:\n{r:?}");
}

/// One test per case, so a case runs and reports alone
/// (`cargo test golden::case::qwen3`); `test_name = "folder"` where the
/// folder's name is not a Rust name.
macro_rules! golden_cases {
    ($($case:ident $(= $dir:literal)?),+ $(,)?) => {
        mod case {
            $(
                #[test]
                fn $case() {
                    super::check_case(golden_cases!(@dir $case $($dir)?));
                }
            )+
        }
        pub(crate) const CASES: &[&str] = &[$(golden_cases!(@dir $case $($dir)?)),+];
    };
    (@dir $case:ident $dir:literal) => { $dir };
    (@dir $case:ident) => { stringify!($case) };
}

golden_cases!(
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
    bailing_moe_q4,
    bailing_moe_sigmoid,
    bailing_moe_v3,
    bailing_moe_v3_hf,
    bailing_moe_v3_hf_kv_b,
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
    kimi_k2,
    kimi_k25,
    kimi_linear,
    kimi_linear_hf,
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

/// Every case under `goldens/` has its test above.
#[test]
fn every_golden_case_has_a_test() {
    let cases = Golden::cases(&goldens()).expect("goldens folder");
    assert!(
        cases.len() >= 5,
        "expected golden cases, found {}",
        cases.len()
    );
    for case in &cases {
        let name = case.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(
            CASES.contains(&name),
            "goldens/{name} has no test in tests/golden.rs"
        );
    }
}

/// Linear layers that read one value run as one projection (on the CPU by
/// default): same logits as separate projections, fewer matmuls per step.
#[test]
fn fused_projections_match_separate_ones() {
    use lmspec::engine::{runtime, Model};
    use mlx_rs::Array;

    let _guard = mlx_lock();
    let lib = library();
    for case in ["llama", "llama_q4", "qwen2"] {
        let dir = goldens().join(case).join("model");
        let mut runs = Vec::new();
        for fuse in [true, false] {
            let opts = crate::support::opts(&lib, None).with_fusion(fuse);
            let model = Model::load(&dir, &opts);
            let model = model.unwrap_or_else(|e| panic!("{case}: {e}"));
            let tokens = Array::from_slice(&[1i32, 5, 9, 2, 7], &[1, 5]);
            let logits = model.forward(&tokens, None).expect("forward");
            let dot = runtime::graph_dot(&[&logits]).expect("graph");
            let matmuls = runtime::primitive_census(&dot)
                .iter()
                .filter(|(k, _)| k.contains("Matmul"))
                .map(|(_, n)| *n)
                .sum::<usize>();
            let logits = logits.contiguous().expect("logits");
            logits.eval().expect("eval");
            runs.push((logits.as_slice::<f32>().to_vec(), matmuls));
        }
        let (fused, separate) = (&runs[0], &runs[1]);
        let worst = fused
            .0
            .iter()
            .zip(&separate.0)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "{case}: fused logits differ by {worst}");
        // Per layer q/k/v become one matmul and gate/up another.
        assert!(
            fused.1 < separate.1,
            "{case}: {} matmuls fused vs {} separate",
            fused.1,
            separate.1
        );
    }
}
