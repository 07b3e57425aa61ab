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
/// (`cargo test golden::case::qwen3`).
macro_rules! golden_cases {
    ($($case:ident),+ $(,)?) => {
        mod case {
            $(
                #[test]
                fn $case() {
                    super::check_case(stringify!($case));
                }
            )+
        }
        const CASES: &[&str] = &[$(stringify!($case)),+];
    };
}

golden_cases!(
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
