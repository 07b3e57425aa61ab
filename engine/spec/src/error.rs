//! Errors of the spec language. Every error that comes from user input
//! names where: the file, the node path inside it and the field.
use std::path::PathBuf;

/// Shorthand used across the crate.
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
    /// A checkpoint no spec can serve (a GGUF architecture without a spec).
    #[error("{}: {msg}", file.display())]
    Weights { file: PathBuf, msg: String },
    /// No spec claims the checkpoint's `model_type`.
    #[error("{}: model_type '{model_type}' is not claimed by any spec (known: {})", file.display(), known.join(", "))]
    UnknownModelType {
        file: PathBuf,
        model_type: String,
        known: Vec<String>,
    },
    /// Reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Bad arguments to an API call (unknown spec names...).
    #[error("{0}")]
    Usage(String),
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
