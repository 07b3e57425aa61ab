//! lmspec-engine: runs specs on MLX.
//!
//! A spec is parsed, checked and expanded for a checkpoint's config by
//! `lmspec-spec` (no MLX there); this crate loads the checkpoint's weights
//! ([`weights`], [`gguf`]), binds them to the expanded graph, builds each op
//! on MLX ([`ops`]) into a [`plan::Plan`] and runs it with per-op state
//! ([`cache`]). [`Model`] is the public entry point, configured by
//! [`LoadOptions`].
pub mod adapter;
pub mod batch;
pub mod cache;
pub mod cache_file;
pub mod cpu_kernels;
pub mod distributed;
pub mod error;
pub mod gguf;
pub mod gguf_tensors;
pub mod gpu_kernels;
pub mod inputs;
mod kernel_groups;
pub mod memory;
pub mod model;
pub mod ops;
pub mod plan;
pub mod runtime;
pub mod weights;

pub use batch::BatchCache;
pub use cache::ModelCache;
pub use error::{Error, Result};
pub use inputs::{in_pass, ForwardInputs, Pass};
pub use lmspec_spec as spec;
pub use lmspec_spec::{Spec, SpecLibrary};
pub use model::{LoadOptions, Model, WeightPlan};
