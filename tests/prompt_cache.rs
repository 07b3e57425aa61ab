//! Prompt caches as files: lmspec's own round trip (save -> load ->
//! continue equals continuing without saving) for standard, rotating,
//! 4-bit quantized and recurrent caches; the cross-engine round trip with
//! mlx-lm both ways; refusal of another model's cache and of broken files.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use lmspec::engine::cache::{CacheOptions, ModelCache};
use lmspec::engine::model::Model;
use mlx_rs::Array;

use crate::support::{goldens, json_floats, library, load_model, mlx_lock, read_json, root};

const PROMPT: [u32; 11] = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200];
const NEXT: [u32; 3] = [33, 8, 151];

struct Case {
    golden: &'static str,
    max_kv_size: Option<i32>,
    kv_bits: Option<i32>,
    kv_group: i32,
}

const CASES: [Case; 6] = [
    // Standard KV.
    Case {
        golden: "llama",
        max_kv_size: None,
        kv_bits: None,
        kv_group: 64,
    },
    // Rotating, wrapped (max_kv_size below the prompt length).
    Case {
        golden: "llama",
        max_kv_size: Some(8),
        kv_bits: None,
        kv_group: 64,
    },
    // Sliding-window layers (rotating) beside global ones.
    Case {
        golden: "gemma3_text",
        max_kv_size: None,
        kv_bits: None,
        kv_group: 64,
    },
    // 4-bit quantized KV (head width 32: a whole group).
    Case {
        golden: "llama_hd32",
        max_kv_size: None,
        kv_bits: Some(4),
        kv_group: 32,
    },
    // Convolution and recurrent state.
    Case {
        golden: "mamba2",
        max_kv_size: None,
        kv_bits: None,
        kv_group: 64,
    },
    // Token-shift rows and the wkv7 state, three slots a layer.
    Case {
        golden: "rwkv7",
        max_kv_size: None,
        kv_bits: None,
        kv_group: 64,
    },
];

fn model(name: &str) -> Model {
    load_model(&goldens().join(name).join("model"), &library(), None).expect("golden loads")
}

fn row(tokens: &[u32]) -> Array {
    let t: Vec<i32> = tokens.iter().map(|&x| x as i32).collect();
    Array::from_slice(&t, &[1, t.len() as i32])
}

/// The prompt processed into a fresh cache as the case says.
fn prefilled(m: &Model, case: &Case) -> ModelCache {
    let mut cache = m.new_cache_with(CacheOptions {
        max_kv_size: case.max_kv_size,
    });
    m.forward(&row(&PROMPT), Some(&mut cache)).expect("prefill");
    if let Some(bits) = case.kv_bits {
        cache
            .maybe_quantize(0, case.kv_group, bits)
            .expect("quantize");
    }
    mlx_rs::transforms::eval(cache.arrays()).expect("eval");
    cache
}

/// The last position's logits after feeding `NEXT`.
fn continue_logits(m: &Model, cache: &mut ModelCache) -> Vec<f32> {
    let logits = m.forward(&row(&NEXT), Some(cache)).expect("continue");
    let v = *logits.shape().last().expect("vocab");
    let last = logits
        .reshape(&[-1, v])
        .expect("2-D")
        .as_dtype(mlx_rs::Dtype::Float32)
        .expect("f32");
    last.eval().expect("eval");
    let all = last.as_slice::<f32>();
    all[all.len() - v as usize..].to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn ids(t: &[u32]) -> String {
    t.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn python(args: &[String]) {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/prompt_cache/mlx_cache.py"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "mlx_cache.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn case_args(case: &Case) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(n) = case.max_kv_size {
        out.extend(["--max-kv-size".to_string(), n.to_string()]);
    }
    if let Some(b) = case.kv_bits {
        out.extend([
            "--kv-bits".to_string(),
            b.to_string(),
            "--kv-group-size".to_string(),
            case.kv_group.to_string(),
        ]);
    }
    out
}

/// A file named `name` in `dir`, a test's own temporary folder (removed
/// when the test ends).
fn tmp(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// The ids an n-gram embedding keeps (int64, beside latent-attention
/// caches, whose layout mlx-lm's files do not share) survive a save and a
/// load: the continuation is the same.
#[test]
fn a_saved_ngram_state_continues_like_the_original() {
    let tmp_dir = tempfile::tempdir().expect("a temporary folder");
    let _g = mlx_lock();
    let case = Case {
        golden: "longcat_flash_ngram",
        max_kv_size: None,
        kv_bits: None,
        kv_group: 64,
    };
    let m = model(case.golden);
    let mut original = prefilled(&m, &case);
    let saved = original.clone();
    let want = continue_logits(&m, &mut original);
    let file = tmp(&tmp_dir, "ngram.safetensors");
    m.save_cache(&saved, &file, &BTreeMap::new()).expect("save");
    let (mut loaded, _) = m.load_cache(&file).expect("load");
    let got = continue_logits(&m, &mut loaded);
    assert_eq!(max_diff(&want, &got), 0.0, "n-gram state round trip");
}

#[test]
fn saved_caches_continue_like_the_original_in_both_engines() {
    let tmp_dir = tempfile::tempdir().expect("a temporary folder");
    let _g = mlx_lock();
    for (k, case) in CASES.iter().enumerate() {
        let what = format!("case {k} ({})", case.golden);
        let m = model(case.golden);
        let dir = goldens().join(case.golden).join("model");
        let mut original = prefilled(&m, case);
        let saved = original.clone();
        let want = continue_logits(&m, &mut original);

        // lmspec -> lmspec.
        let file = tmp(&tmp_dir, &format!("lmspec-{k}.safetensors"));
        m.save_cache(&saved, &file, &BTreeMap::new()).expect("save");
        let (mut loaded, meta) = m.load_cache(&file).expect("load");
        assert_eq!(loaded.offset(), PROMPT.len() as i32, "{what}");
        assert_eq!(meta.get("lmspec.fingerprint"), Some(&m.fingerprint()));
        let got = continue_logits(&m, &mut loaded);
        assert_eq!(max_diff(&want, &got), 0.0, "{what}: lmspec round trip");

        // lmspec -> mlx-lm.
        let logits = tmp(&tmp_dir, &format!("mlx-{k}.json"));
        let mut args = vec![
            "continue".to_string(),
            "--model".into(),
            dir.display().to_string(),
            "--tokens".into(),
            ids(&NEXT),
            "--cache".into(),
            file.display().to_string(),
            "--out".into(),
            logits.display().to_string(),
        ];
        python(&args);
        let theirs = json_floats(&read_json(&logits));
        let d = max_diff(&want, &theirs);
        assert!(d < 1e-4, "{what}: mlx-lm continuing lmspec's cache: {d}");

        // mlx-lm -> lmspec.
        let mlx_file = tmp(&tmp_dir, &format!("mlx-{k}.safetensors"));
        args = vec![
            "write".to_string(),
            "--model".into(),
            dir.display().to_string(),
            "--tokens".into(),
            ids(&PROMPT),
            "--cache".into(),
            mlx_file.display().to_string(),
        ];
        args.extend(case_args(case));
        python(&args);
        let (mut from_mlx, _) = m.load_cache(&mlx_file).expect("mlx-lm's file loads");
        // mlx-lm records positions only in key/value caches.
        let recorded = if matches!(case.golden, "mamba2" | "rwkv7") {
            0
        } else {
            PROMPT.len()
        };
        assert_eq!(from_mlx.offset(), recorded as i32, "{what}");
        let got = continue_logits(&m, &mut from_mlx);
        // Quantizing keys that differ in the last float bit may land in
        // another bin, so quantized caches compare at a looser bound.
        let tol = if case.kv_bits.is_some() { 2e-2 } else { 1e-4 };
        let d = max_diff(&want, &got);
        assert!(d < tol, "{what}: lmspec continuing mlx-lm's cache: {d}");
    }
}

#[test]
fn another_models_cache_is_refused() {
    let tmp_dir = tempfile::tempdir().expect("a temporary folder");
    let _g = mlx_lock();
    let case = &CASES[0];
    let llama = model("llama");
    let file = tmp(&tmp_dir, "llama.safetensors");
    llama
        .save_cache(&prefilled(&llama, case), &file, &BTreeMap::new())
        .expect("save");
    let other = model("gemma2");
    let err = other.load_cache(&file).expect_err("refused").to_string();
    assert!(err.contains("made by model llama"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");

    // An mlx-lm file names the folder of the model that made it.
    let mlx_file = tmp(&tmp_dir, "mlx-llama.safetensors");
    python(&[
        "write".to_string(),
        "--model".into(),
        goldens().join("llama/model").display().to_string(),
        "--tokens".into(),
        ids(&PROMPT),
        "--cache".into(),
        mlx_file.display().to_string(),
    ]);
    let err = other
        .load_cache(&mlx_file)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("made by model"), "{err}");
}

fn write_raw(path: &Path, arrays: &[(&str, Array)], meta: &[(&str, &str)]) {
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Array::save_safetensors(arrays.iter().map(|(k, a)| (*k, a)), &meta, path).expect("write");
}

#[test]
fn broken_cache_files_get_errors_naming_the_file() {
    let tmp_dir = tempfile::tempdir().expect("a temporary folder");
    let _g = mlx_lock();
    let m = model("llama");
    let check = |path: &Path, want: &str| {
        let err = m.load_cache(path).expect_err("refused").to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(want), "expected '{want}' in: {err}");
    };
    // Not a safetensors file at all.
    let junk = tmp(&tmp_dir, "junk.safetensors");
    std::fs::write(&junk, b"not a cache").expect("write");
    check(&junk, "prompt cache");
    // A weights file: safetensors without cache metadata.
    check(
        &goldens().join("llama/model/model.safetensors"),
        "is not part of a prompt cache",
    );
    // A class lmspec does not read.
    let odd = tmp(&tmp_dir, "odd.safetensors");
    let z = mlx_rs::ops::zeros::<f32>(&[1, 1, 2, 4]).expect("zeros");
    write_raw(
        &odd,
        &[("0.0", z.clone())],
        &[("1.0", "FancyCache"), ("2.0", "")],
    );
    check(&odd, "layer caches");
    // The right class with the wrong number of layers and shapes.
    let short = tmp(&tmp_dir, "short.safetensors");
    write_raw(
        &short,
        &[("0.0", z.clone()), ("0.1", z), ("0.2", Array::from_int(2))],
        &[
            ("1.0", "KVCache"),
            ("2.0", ""),
            ("2.1.0", "0.2"),
            ("2.1.1", "scalar"),
        ],
    );
    check(&short, "layer caches");
    // A truncated copy of a good file.
    let good = tmp(&tmp_dir, "good.safetensors");
    m.save_cache(&prefilled(&m, &CASES[0]), &good, &BTreeMap::new())
        .expect("save");
    let bytes = std::fs::read(&good).expect("read");
    let cut = tmp(&tmp_dir, "cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    check(&cut, "prompt cache");
}
