//! Paths and helpers shared by the integration tests.
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use lmspec::engine::SpecLibrary;

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
