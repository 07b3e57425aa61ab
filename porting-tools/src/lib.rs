//! lmspec porting tools: golden cases made by mlx-lm, tensor comparison with
//! named tolerance levels, node-by-node diffs with reports, spec scaffolding,
//! the coverage table, the benchmark beside mlx-lm, and step-by-step traces
//! of the cached path to compare runs on two devices.
pub mod bench;
pub mod coverage;
pub mod diff;
pub mod golden;
pub mod report;
pub mod scaffold;
pub mod tolerance;
pub mod trace;
