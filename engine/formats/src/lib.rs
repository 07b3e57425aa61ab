//! Header checks for checkpoint files.
//!
//! MLX's own readers trust what a file says about itself: a truncated GGUF
//! or a count of 2^60 strings crashes the process. This crate reads only the
//! header of a safetensors or GGUF file, checks every length, count, offset
//! and size against the file and against [`Limits`], and reports the first
//! problem as a [`FormatError`] that names the part of the file at fault.
//! No allocation is sized by an untrusted number: counts are checked against
//! the bytes left in the file first, and buffers grow only as bytes arrive.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

/// `return Err(FormatError::new(node, field, format!(msg...)))`.
macro_rules! bail {
    ($node:expr, $field:expr, $($msg:tt)+) => {
        return Err($crate::FormatError::new($node, $field, format!($($msg)+)))
    };
}

pub mod gguf;
pub mod gguf_data;
pub mod guard;
pub mod safetensors;
#[cfg(test)]
mod tests;

/// Where and what: `node` is a path inside the file such as `"header"`,
/// `"metadata['general.alignment']"`, `"tensors[3] 'blk.0.attn_q.weight'"` or
/// `"tensor 'x'"`; `field` names the part of it, such as `"dims[1]"`,
/// `"data_offsets"`, `"type"` or `"length"`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{node}: {field}: {msg}")]
pub struct FormatError {
    pub node: String,
    pub field: String,
    pub msg: String,
}

impl FormatError {
    pub fn new(node: impl Into<String>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }

    fn io(node: &str, field: &str, e: &std::io::Error) -> Self {
        let msg = match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "the file ends early".to_string(),
            _ => format!("read failed: {e}"),
        };
        Self::new(node, field, msg)
    }
}

/// Bounds on what a header may declare, checked as it is read: a count over
/// a limit fails before any of its items is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of header: the safetensors JSON, or everything before the GGUF
    /// tensor data. Also bounds the memory a check uses (GGUF metadata
    /// values take up to ~32 bytes of memory per byte of file).
    pub max_header_bytes: u64,
    pub max_tensors: u64,
    /// GGUF metadata key/value pairs.
    pub max_metadata: u64,
    /// Depth of GGUF arrays within arrays.
    pub max_nesting: usize,
    /// Axes of a tensor; GGUF never allows more than 4 whatever this says.
    pub max_dims: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 256 << 20,
            max_tensors: 1_000_000,
            max_metadata: 1_000_000,
            max_nesting: 8,
            max_dims: 8,
        }
    }
}

/// Opens `path` for a check: a buffered reader and the file's length.
fn open(path: &Path) -> Result<(BufReader<File>, u64), FormatError> {
    let fail =
        |e: std::io::Error| FormatError::new("file", path.display().to_string(), e.to_string());
    let file = File::open(path).map_err(fail)?;
    let len = file.metadata().map_err(fail)?.len();
    Ok((BufReader::new(file), len))
}
