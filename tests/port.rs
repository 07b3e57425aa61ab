//! Porting tools: node-by-node diff (and its report), scaffolding, coverage.
use std::fs;

use lmspec::engine::SpecLibrary;
use lmspec::port::{coverage, diff, report, scaffold};
use tempfile::TempDir;

use crate::support::{goldens, library, mlx_lock, root};

/// A copy of the spec folder with `edit` applied to the named files
/// (paths relative to specs/) and `drop` files removed.
fn specs_copy(edit: &[(&str, &dyn Fn(String) -> String)], drop: &[&str]) -> (TempDir, SpecLibrary) {
    let dir = tempfile::tempdir().expect("tempdir");
    for sub in ["blocks", "models"] {
        fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        for entry in fs::read_dir(root().join("specs").join(sub)).expect("specs") {
            let p = entry.expect("entry").path();
            let rel = format!("{sub}/{}", p.file_name().expect("name").to_string_lossy());
            if drop.contains(&rel.as_str()) {
                continue;
            }
            let mut text = fs::read_to_string(&p).expect("read");
            for (name, f) in edit {
                if *name == rel {
                    text = f(text);
                }
            }
            fs::write(dir.path().join(&rel), text).expect("write");
        }
    }
    let lib = SpecLibrary::open(dir.path()).expect("library");
    (dir, lib)
}

/// `models/NAME.yaml` of `base` and of every spec whose `extends` chain
/// reaches it.
fn extending(base: &str) -> Vec<String> {
    let mut parents: Vec<(String, Option<String>, String)> = Vec::new();
    for entry in fs::read_dir(root().join("specs/models")).expect("specs") {
        let p = entry.expect("entry").path();
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&fs::read_to_string(&p).expect("read")).expect("yaml");
        let stem = p.file_stem().expect("stem").to_string_lossy().to_string();
        let name = doc["name"].as_str().map(str::to_string).unwrap_or(stem);
        let file = format!("models/{}", p.file_name().expect("name").to_string_lossy());
        parents.push((name, doc["extends"].as_str().map(str::to_string), file));
    }
    let reaches = |start: &str| {
        let mut name = start.to_string();
        for _ in 0..parents.len() {
            if name == base {
                return true;
            }
            match parents
                .iter()
                .find(|(n, _, _)| *n == name)
                .and_then(|(_, e, _)| e.clone())
            {
                Some(parent) => name = parent,
                None => return false,
            }
        }
        false
    };
    parents
        .iter()
        .filter(|(n, _, _)| reaches(n))
        .map(|(_, _, f)| f.clone())
        .collect()
}

fn run_diff(case: &str, lib: &SpecLibrary, spec: Option<&str>) -> diff::DiffReport {
    let _guard = mlx_lock();
    let golden = goldens().join(case);
    diff::diff(
        &golden.join("model"),
        &golden,
        &crate::support::opts(lib, spec),
        None,
    )
    .expect("diff runs")
}

#[test]
fn diff_passes_on_the_goldens_with_taps() {
    for case in ["llama", "qwen3", "qwen2", "llama_q4"] {
        let r = run_diff(case, &library(), None);
        assert!(r.passed(), "{case}:\n{}", r.table());
        assert!(
            r.rows.len() >= 20,
            "{case}: only {} taps compared",
            r.rows.len()
        );
        assert!(
            r.rows.iter().any(|n| n.name == "layers.1.mlp"),
            "{}",
            r.table()
        );
    }
}

#[test]
fn swapped_q_k_norm_is_found_at_q_norm() {
    let swap = |t: String| {
        t.replace("weight: q_norm", "weight: @@")
            .replace("weight: k_norm", "weight: q_norm")
            .replace("weight: @@", "weight: k_norm")
    };
    let (_d, lib) = specs_copy(&[("blocks/transformer.yaml", &swap)], &[]);
    let r = run_diff("qwen3", &lib, None);
    assert!(!r.passed());
    assert_eq!(
        r.first_failure().expect("a failure").name,
        "layers.0.attn.q_norm",
        "{}",
        r.table()
    );
    let html = report::html(&r);
    assert!(
        html.contains("<svg") && html.contains("<polyline"),
        "plot missing"
    );
    assert!(
        html.contains("class=\"first-divergent\""),
        "first divergent node not highlighted"
    );
    assert!(html.contains("First divergent node: <code>layers.0.attn.q_norm</code>"));
}

#[test]
fn wrong_rope_theta_is_found_at_the_rope() {
    let theta = |t: String| {
        t.replace(
            "rope_theta: {type: positive, default: 10000.0}",
            "rope_theta: {type: positive, value: 500000.0}",
        )
    };
    let (_d, lib) = specs_copy(&[("models/llama.yaml", &theta)], &[]);
    let r = run_diff("llama", &lib, None);
    assert_eq!(
        r.first_failure().expect("a failure").name,
        "layers.0.attn.q_rope",
        "{}",
        r.table()
    );
    assert!(r
        .rows
        .iter()
        .take_while(|n| n.name != "layers.0.attn.q_rope")
        .all(|n| n.passed));
}

#[test]
fn scaffold_drafts_qwen3_from_the_other_specs() {
    // Every spec that extends qwen3, directly or not, goes too.
    let gone = extending("qwen3");
    let drop: Vec<&str> = gone.iter().map(String::as_str).collect();
    assert!(drop.contains(&"models/qwen3_moe.yaml"), "{drop:?}");
    let (dir, lib) = specs_copy(&[], &drop);
    let model = goldens().join("qwen3/model");
    let draft = {
        let _guard = mlx_lock();
        scaffold::scaffold(&model, &lib).expect("scaffold")
    };
    assert_eq!(draft.model_type, "qwen3");
    assert!(
        draft
            .best
            .overrides
            .contains(&("qk_norm".to_string(), true)),
        "{}",
        draft.yaml
    );
    assert!(
        draft.best.missing.is_empty() && draft.best.unused.is_empty(),
        "{}",
        draft.yaml
    );
    assert!(draft.yaml.contains("extends: "), "{}", draft.yaml);
    fs::write(dir.path().join("models/qwen3.yaml"), &draft.yaml).expect("write draft");
    let lib = SpecLibrary::open(dir.path()).expect("library with the draft");
    let r = run_diff("qwen3", &lib, None);
    assert_eq!(r.spec, "qwen3");
    assert!(
        r.passed(),
        "draft does not pass:\n{}\n{}",
        draft.yaml,
        r.table()
    );
}

#[test]
fn coverage_lists_mlx_lm_types_and_passing_specs() {
    let mlx_lm =
        coverage::find_mlx_lm(&root().join(".venv")).expect("mlx_lm in .venv (run the setup)");
    let types = coverage::mlx_lm_model_types(&mlx_lm).expect("types");
    assert!(types.len() > 50, "{}", types.len());
    assert_eq!(types.get("mistral").map(String::as_str), Some("llama"));
    let rows = {
        let _guard = mlx_lock();
        coverage::coverage(&library(), &mlx_lm, &goldens()).expect("coverage")
    };
    for mt in ["llama", "mistral", "qwen2", "qwen3"] {
        let row = rows.iter().find(|r| r.model_type == mt).expect(mt);
        assert_eq!(row.status(), "pass", "{mt}: {row:?}");
    }
    // Every claimed type reads or declares every key mlx-lm reads.
    for row in rows.iter().filter(|r| r.spec.is_some()) {
        if let Some((n, undeclared)) = &row.keys {
            assert!(*n > 0, "{}: no reference keys parsed", row.model_type);
            assert!(undeclared.is_empty(), "{}: {undeclared:?}", row.model_type);
        }
    }
    let md = coverage::markdown(&rows);
    assert!(md.contains("| qwen3 | qwen3 | qwen3 |"), "{md}");
    assert!(md.contains("`gemma2`"), "unclaimed types listed");
    let committed = fs::read_to_string(root().join("docs/coverage.md")).expect("docs/coverage.md");
    assert_eq!(
        committed, md,
        "docs/coverage.md is stale: run `lmspec port coverage --out docs/coverage.md`"
    );
}

#[test]
fn a_reference_key_a_spec_does_not_declare_is_listed() {
    let mlx_lm =
        coverage::find_mlx_lm(&root().join(".venv")).expect("mlx_lm in .venv (run the setup)");
    let source = fs::read_to_string(mlx_lm.join("models/gpt2.py")).expect("gpt2.py");
    let reference = coverage::reference_keys(&source);
    let drop_declaration = |t: String| {
        t.lines()
            .filter(|l| !l.trim_start().starts_with("n_ctx:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (_d, lib) = specs_copy(&[("models/gpt2.yaml", &drop_declaration)], &[]);
    let spec = lib.load("gpt2").expect("gpt2 loads");
    assert_eq!(coverage::undeclared_keys(&spec, &reference), ["n_ctx"]);
    let spec = library().load("gpt2").expect("gpt2 loads");
    assert!(coverage::undeclared_keys(&spec, &reference).is_empty());
}

/// A fixed-seed sample of the differential config fuzzer: one random config
/// per claimed type, built with mlx-lm and compared with lmspec
/// (`make fuzz-configs` runs 40 per type).
#[test]
fn differential_config_fuzzing_sample() {
    let out = std::process::Command::new(root().join(".venv/bin/python"))
        .args([
            "porting-tools/python/fuzz_configs.py",
            "--per-type",
            "1",
            "--seed",
            "7",
            "--lmspec",
            env!("CARGO_BIN_EXE_lmspec"),
        ])
        .current_dir(root())
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 MISMATCH, 0 UNCLEAR"), "{stdout}");
}
