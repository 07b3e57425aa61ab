//! lmspec-spec: the spec language, without MLX.
//!
//! The stages run in this order, one module each:
//!
//! 1. [`raw`]: the file format as serde structs;
//! 2. [`library`]: finding spec files, `extends`, the shared block library
//!    (with the config entries its blocks own) into one [`Spec`];
//! 3. [`check`]: validation without a config, giving a [`CheckedSpec`]
//!    (parsed expressions, typed op schemas from [`ops`], declared with
//!    [`schema`]);
//! 4. [`config`]: binding a checkpoint's `config.json` to typed values
//!    ([`expr`] is the expression language they are computed in);
//! 5. [`expand`]: the checked spec unrolled for one config into a
//!    [`Graph`] of typed op configs with layouts and weight needs;
//! 6. [`render`]: DOT, the text dump and its explanation.
//!
//! Building a graph on MLX is `lmspec-engine`'s job.
pub mod check;
pub mod config;
pub mod error;
pub mod expand;
pub mod expr;
pub mod graph;
pub mod library;
pub mod limits;
pub mod ops;
pub mod pattern;
pub mod raw;
pub mod render;
pub mod schema;

pub use check::{check, CheckedSpec};
pub use error::{Error, Result};
pub use expand::{expand, expand_for, expand_for_ranks};
pub use graph::{Graph, Node, Src};
pub use library::{Sourced, Spec, SpecLibrary};
