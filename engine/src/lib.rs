//! lmspec engine: language-model architectures as data.
//!
//! A spec (YAML, see `docs/spec-language.md`) is parsed ([`spec`]),
//! validated and expanded for a checkpoint's config ([`graph`]), bound to
//! weights ([`weights`]) and compiled into a [`plan::Plan`] that runs on MLX.
//! [`Model`] is the public entry point.
pub mod cache;
pub mod embed;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod graph;
pub mod lm;
pub mod model;
pub mod ops;
pub mod plan;
pub mod runtime;
pub mod sampling;
pub mod spec;
pub mod template;
pub mod tokenizer;
pub mod tools;
pub mod weights;

pub use cache::ModelCache;
pub use embed::{Embedder, Pooling};
pub use error::{Error, Result};
pub use lm::{run_tool_loop, ChatSession, LanguageModel, Message, ModelContainer, Tool};
pub use model::Model;
pub use spec::library::{Spec, SpecLibrary};
