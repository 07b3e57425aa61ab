//! lmspec engine.
pub mod runtime;
