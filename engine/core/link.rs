// Link settings shared by every lmspec package that produces binaries or
// tests (`build.rs` here, and the build scripts of the packages that point
// their `build` key at it).
//
// - rpath to the MLX wheel's `lib/`, so binaries find `libmlx.so` without
//   LD_LIBRARY_PATH; RUNPATH (new dtags) so LD_LIBRARY_PATH can still select
//   another backend such as the CUDA wheel.
// - OpenBLAS loaded ahead of the wheel's reference BLAS: MLX's CPU matmuls
//   resolve `cblas_sgemm` to the first definition in load order. Opt out at
//   build time with `LMSPEC_BLAS=reference`.
use std::env;
use std::path::PathBuf;

pub fn emit() {
    println!("cargo:rerun-if-env-changed=LMSPEC_MLX_DIR");
    println!("cargo:rerun-if-env-changed=LMSPEC_BLAS");
    if let Some(dir) = env::var_os("LMSPEC_MLX_DIR") {
        let lib = PathBuf::from(dir).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!(
            "cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}",
            lib.display()
        );
    }
    let blas = env::var("LMSPEC_BLAS").unwrap_or_else(|_| "openblas".to_string());
    match blas.as_str() {
        "reference" => {}
        "openblas" => {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-l:libopenblas.so.0,--as-needed")
        }
        other => panic!("LMSPEC_BLAS={other}: expected `openblas` or `reference`"),
    }
}
