//! Paths and helpers shared by the integration tests.
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use lmspec::engine::{Error, LoadOptions, Model, SpecLibrary};
use lmspec::lm::LanguageModel;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn goldens() -> PathBuf {
    root().join("goldens")
}

pub fn library() -> SpecLibrary {
    SpecLibrary::open(&root().join("specs")).expect("spec library opens")
}

static MLX: Mutex<()> = Mutex::new(());

/// MLX work in tests is serialised through this lock.
pub fn mlx_lock() -> MutexGuard<'static, ()> {
    MLX.lock().unwrap_or_else(|e| e.into_inner())
}

/// Load options: weights as stored, the source tree's specs, an optional
/// explicit spec.
pub fn opts(lib: &SpecLibrary, spec: Option<&str>) -> LoadOptions {
    let mut o = LoadOptions::as_stored().with_library(lib.clone());
    o.spec = spec.map(str::to_string);
    o
}

pub fn load_model(path: &Path, lib: &SpecLibrary, spec: Option<&str>) -> Result<Model, Error> {
    Model::load(path, &opts(lib, spec))
}

pub fn load_lm(path: &Path, lib: &SpecLibrary, spec: Option<&str>) -> Result<LanguageModel, Error> {
    LanguageModel::load(path, &opts(lib, spec))
}

/// A JSON fixture; a failure names the file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A JSON list of numbers as float32.
pub fn json_floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("a list of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// A JSON list of token ids.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// The last row of a logits array (`[..., vocab]`), as float32.
pub fn last_row_f32(logits: &mlx_rs::Array) -> Vec<f32> {
    let vocab = *logits.shape().last().expect("axes");
    let rows = logits
        .reshape(&[-1, vocab])
        .and_then(|r| r.as_dtype(mlx_rs::Dtype::Float32))
        .and_then(|r| r.contiguous())
        .expect("f32 rows");
    rows.eval().expect("eval");
    let all = rows.as_slice::<f32>();
    all[all.len() - vocab as usize..].to_vec()
}
