//! The spec language: file format, expressions, config binding, library.
pub mod config;
pub mod expr;
pub mod library;
pub mod raw;
