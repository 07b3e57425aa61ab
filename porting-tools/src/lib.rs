//! lmspec porting tools: golden cases made by mlx-lm, tensor comparison with
//! named tolerance levels.
pub mod golden;
pub mod tolerance;
