//! lmspec: language-model architectures as data.
//!
//! The engine ([`engine`]) runs YAML specs on MLX; the porting tools
//! ([`port`]) compare it with mlx-lm. The `lmspec` binary is the CLI.
pub use lmspec_engine as engine;
pub use lmspec_port as port;
