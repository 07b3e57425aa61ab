//! Golden regression: every case under `goldens/` against the spec that
//! claims its model_type, within the case's tolerance level.
use lmspec::port::golden::{self, Golden};

use crate::support::{goldens, library, mlx_lock};

#[test]
fn every_golden_case_matches_mlx_lm() {
    let _guard = mlx_lock();
    let lib = library();
    let cases = Golden::cases(&goldens()).expect("goldens folder");
    assert!(
        cases.len() >= 5,
        "expected golden cases, found {}",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in &cases {
        let r = golden::run(case, &crate::support::opts(&lib, None))
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
        if !r.passed() {
            failures.push(format!("{r:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "golden failures:\n{}",
        failures.join("\n")
    );
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
