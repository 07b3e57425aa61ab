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
        let r =
            golden::run(case, &lib, None).unwrap_or_else(|e| panic!("{}: {e:#}", case.display()));
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
