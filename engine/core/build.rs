// The build script of every lmspec package that produces binaries or tests
// (the root package, porting-tools and the engine crates point their `build`
// key here): link settings only (link.rs). The engine crate's own script,
// build_engine.rs, also compiles the CPU kernels.
mod link;

fn main() {
    link::emit();
}
