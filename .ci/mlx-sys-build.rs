// Build script installed into the patched `mlx-sys` crate by `.ci/patch-mlx.py`.
//
// It compiles mlx-c against the MLX shipped in the PyPI wheel (no network
// fetch), links `libmlx.so` dynamically from the wheel, and generates the
// bindings with bindgen. The MLX directory comes from `LMSPEC_MLX_DIR`
// (set for the workspace in `.cargo/config.toml`).

use std::env;
use std::path::PathBuf;

#[allow(dead_code)]
#[path = "src/bindgen_config.rs"]
mod bindgen_config;

fn mlx_dir() -> PathBuf {
    let dir = env::var_os("LMSPEC_MLX_DIR")
        .map(PathBuf::from)
        .expect("LMSPEC_MLX_DIR must point at the MLX wheel directory (run the setup)");
    dir.canonicalize()
        .unwrap_or_else(|e| panic!("LMSPEC_MLX_DIR {}: {e}", dir.display()))
}

fn main() {
    println!("cargo:rerun-if-env-changed=LMSPEC_MLX_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    let mlx = mlx_dir();
    let mlx_c_root = PathBuf::from("src/mlx-c");

    let dst = cmake::Config::new(&mlx_c_root)
        .define("MLX_C_USE_SYSTEM_MLX", "ON")
        .define("MLX_C_BUILD_EXAMPLES", "OFF")
        .define("MLX_DIR", mlx.join("share/cmake/MLX"))
        .define("CMAKE_BUILD_TYPE", "Release")
        .profile("Release")
        .build_target("mlxc")
        .build();

    println!("cargo:rustc-link-search=native={}/build", dst.display());
    println!("cargo:rustc-link-lib=static=mlxc");
    println!("cargo:rustc-link-search=native={}", mlx.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    println!("cargo::metadata=libdir={}", mlx.join("lib").display());

    let headers =
        bindgen_config::discover_headers(&mlx_c_root).expect("Unable to discover headers");
    for header in &headers {
        println!("cargo:rerun-if-changed={}", header.display());
    }
    let bindings = bindgen_config::builder(&mlx_c_root, &headers)
        .blocklist_type("float16_t")
        .generate()
        .expect("Unable to generate bindings");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("Couldn't write bindings");
}
