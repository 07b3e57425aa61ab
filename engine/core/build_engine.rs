// The engine crate's build script: the shared link settings (link.rs), and
// the CPU kernels (cpu/kernels.cpp), compiled against the C++ headers of the
// MLX wheel the setup installed (`LMSPEC_MLX_DIR`) and linked, like
// mlx-sys, to that wheel's libmlx.so.
mod link;

use std::env;
use std::path::PathBuf;

fn main() {
    link::emit();
    println!("cargo:rerun-if-changed=cpu/kernels.cpp");
    let Some(mlx) = env::var_os("LMSPEC_MLX_DIR") else {
        panic!("LMSPEC_MLX_DIR is not set: run `make setup` (it writes .cargo/config.toml)");
    };
    let include = PathBuf::from(mlx).join("include");
    if !include.join("mlx/primitives.h").exists() {
        panic!(
            "{}: the MLX wheel's C++ headers are missing (mlx/primitives.h); run `make setup`",
            include.display()
        );
    }
    cc::Build::new()
        .cpp(true)
        .file("cpu/kernels.cpp")
        // MLX's headers as system headers: warnings are about our code.
        .flag("-isystem")
        .flag(include.to_string_lossy().as_ref())
        .std("c++20")
        // The kernels are built optimised in every profile.
        .opt_level(3)
        .debug(false)
        .flag("-ffp-contract=off")
        // gcc 12 warns inside its own AVX-512 headers.
        .flag_if_supported("-Wno-maybe-uninitialized")
        .flag_if_supported("-Wno-uninitialized")
        .warnings(true)
        .compile("lmspec_cpu");
}
