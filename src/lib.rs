//! lmspec: language-model architectures as data.
pub use lmspec_engine as engine;
