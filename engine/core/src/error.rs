//! Errors of the engine. Every error that comes from user input names where:
//! the file, the node path inside it and the field.
use std::path::PathBuf;

/// Shorthand used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spec file is malformed or invalid.
    #[error("{}: {node}: {field}: {msg}", file.display())]
    Spec {
        file: PathBuf,
        node: String,
        field: String,
        msg: String,
    },
    /// A checkpoint's config does not satisfy a spec's config schema.
    #[error("{}: {key}: {msg}", file.display())]
    Config {
        file: PathBuf,
        key: String,
        msg: String,
    },
    /// A checkpoint's tensors do not match what the spec needs.
    #[error("{}: {msg}", file.display())]
    Weights { file: PathBuf, msg: String },
    /// No spec claims the checkpoint's `model_type`.
    #[error("{}: model_type '{model_type}' is not claimed by any spec (known: {})", file.display(), known.join(", "))]
    UnknownModelType {
        file: PathBuf,
        model_type: String,
        known: Vec<String>,
    },
    /// A tokenizer is missing or broken.
    #[error("{}: tokenizer: {msg}", file.display())]
    Tokenizer { file: PathBuf, msg: String },
    /// A chat template failed to parse or render.
    #[error("{}: chat template: {msg}", file.display())]
    Template { file: PathBuf, msg: String },
    /// Reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A prompt-cache file is malformed or belongs to another model.
    #[error("{}: prompt cache: {msg}", file.display())]
    Cache { file: PathBuf, msg: String },
    /// Bad arguments to an API call (token shapes, tap names...).
    #[error("{0}")]
    Usage(String),
    /// MLX raised an error while running a plan.
    #[error("mlx: {}", mlx_message(.0))]
    Mlx(#[from] mlx_rs::error::Exception),
}

/// MLX's message without the source locations it appends (build paths of
/// MLX and of Rust's standard library mean nothing to a user).
pub fn mlx_message(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    let cut = text.find(" at /").unwrap_or(text.len());
    let text = text[..cut].trim_matches('"');
    // Some messages come as `what: "what at location"`: keep one copy.
    match text.split_once(": \"") {
        Some((what, rest)) if rest.starts_with(&what.chars().take(30).collect::<String>()) => {
            what.to_string()
        }
        _ => text.to_string(),
    }
}

impl From<lmspec_spec::Error> for Error {
    fn from(e: lmspec_spec::Error) -> Error {
        use lmspec_spec::Error as S;
        match e {
            S::Spec {
                file,
                node,
                field,
                msg,
            } => Error::Spec {
                file,
                node,
                field,
                msg,
            },
            S::Config { file, key, msg } => Error::Config { file, key, msg },
            S::Weights { file, msg } => Error::Weights { file, msg },
            S::UnknownModelType {
                file,
                model_type,
                known,
            } => Error::UnknownModelType {
                file,
                model_type,
                known,
            },
            S::Io { path, source } => Error::Io { path, source },
            S::Usage(m) => Error::Usage(m),
        }
    }
}

impl Error {
    pub fn spec(
        file: impl Into<PathBuf>,
        node: impl Into<String>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Error {
        Error::Spec {
            file: file.into(),
            node: node.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Reads a whole file, naming it in the error.
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn mlx_messages_lose_locations_and_repeats() {
        let m = |s: &str| super::mlx_message(&s.to_string());
        assert_eq!(
            m("[read] no file. at /build/mlx/io.cpp:76"),
            "[read] no file."
        );
        assert_eq!(
            m("[quantize] bad group 32 (1,16): \"[quantize] bad group 32 (1,16) at /x.cpp:9\""),
            "[quantize] bad group 32 (1,16)"
        );
        assert_eq!(m("a plain message"), "a plain message");
    }
}
