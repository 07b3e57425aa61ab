#!/usr/bin/env python3
"""Copy the upstream mlx-sys / mlx-rs crates into target/patched/ and adapt
them to Linux x86-64 against the PyPI MLX wheel.

Each change is a (file, old text, new text) edit that must apply exactly once,
so an upstream version bump fails loudly instead of half-patching. The facts
behind each change are in docs/building.md.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "target" / "patched"
STAMP = DEST / ".stamp"

HALF_FALLBACK = """
#if !defined(HAS_FLOAT16)
#define HAS_FLOAT16
#include <stdint.h>
#if defined(__cplusplus) && defined(__GNUC__) && !defined(__clang__)
typedef _Float16 float16_t;
#else
/* 16-bit stand-in seen by bindgen; values only cross by pointer. */
typedef uint16_t float16_t;
#endif
#endif

#if !defined(HAS_BFLOAT16)
#define HAS_BFLOAT16
#include <stdint.h>
typedef uint16_t bfloat16_t;
#endif

#ifdef __cplusplus
}
#endif

#endif
"""

FLOAT16_STRUCT = """
/// IEEE half-precision value as raw bits (x86-64 has no C `float16_t`).
#[repr(transparent)]
#[derive(Debug, Default, Copy, Clone, PartialEq, Eq)]
pub struct float16_t(pub u16);
"""

EDITS = {
    "mlx-sys": [
        (
            "src/mlx-c/mlx/c/private/io.h",
            'std::format("unable to read {} bytes (read {} instead)", n, read_n)',
            '"unable to read " + std::to_string(n) + " bytes (read " + std::to_string(read_n) + " instead)"',
            2,
        ),
        (
            "src/mlx-c/mlx/c/private/io.h",
            'std::format("[mlx_io_reader] {} in {}", msg, label())',
            '"[mlx_io_reader] " + msg + " in " + label()',
            1,
        ),
        (
            "src/mlx-c/mlx/c/private/io.h",
            'std::format(\n              "unable to write {} bytes (wrote {} instead)", n, wrote_n)',
            '"unable to write " + std::to_string(n) + " bytes (wrote " + std::to_string(wrote_n) + " instead)"',
            1,
        ),
        (
            "src/mlx-c/mlx/c/private/io.h",
            'std::format("[mlx_io_writer] {} in {}", msg, label())',
            '"[mlx_io_writer] " + msg + " in " + label()',
            1,
        ),
        (
            "src/mlx-c/mlx/c/half.h",
            "\n#ifdef __cplusplus\n}\n#endif\n\n#endif\n",
            HALF_FALLBACK,
            1,
        ),
        (
            "src/lib.rs",
            'include!(concat!(env!("OUT_DIR"), "/bindings.rs"));\n',
            'include!(concat!(env!("OUT_DIR"), "/bindings.rs"));\n' + FLOAT16_STRUCT,
            1,
        ),
    ],
    "mlx-rs": [
        (
            "src/random.rs",
            "use mach_sys::mach_time;\n",
            "",
            1,
        ),
        (
            "src/random.rs",
            "let now = unsafe { mach_time::mach_approximate_time() };",
            "let now = std::time::SystemTime::now()\n"
            "            .duration_since(std::time::UNIX_EPOCH)\n"
            "            .map(|d| d.as_nanos() as u64)\n"
            "            .unwrap_or(0);",
            1,
        ),
    ],
}


def upstream_sources():
    manifest = ROOT / ".ci" / "upstream" / "Cargo.toml"
    subprocess.run(["cargo", "fetch", "-q", "--manifest-path", str(manifest)], check=True)
    meta = subprocess.run(
        ["cargo", "metadata", "-q", "--format-version", "1", "--manifest-path", str(manifest)],
        check=True,
        capture_output=True,
        text=True,
    )
    pkgs = json.loads(meta.stdout)["packages"]
    return {p["name"]: Path(p["manifest_path"]).parent for p in pkgs if p["name"] in EDITS}


def stamp_text():
    me = Path(__file__).read_bytes() + (ROOT / ".ci" / "mlx-sys-build.rs").read_bytes()
    import hashlib

    return hashlib.sha256(me).hexdigest()


def main():
    want = stamp_text()
    if STAMP.exists() and STAMP.read_text() == want:
        print("patched MLX crates are up to date")
        return
    sources = upstream_sources()
    missing = set(EDITS) - set(sources)
    if missing:
        sys.exit(f"patch-mlx: upstream crates not found: {sorted(missing)}")
    for name, src in sources.items():
        dst = DEST / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        for rel, old, new, count in EDITS[name]:
            path = dst / rel
            text = path.read_text()
            found = text.count(old)
            if found != count:
                sys.exit(f"patch-mlx: {name}/{rel}: expected {count} match(es), found {found}: {old[:60]!r}")
            path.write_text(text.replace(old, new))
    shutil.copy(ROOT / ".ci" / "mlx-sys-build.rs", DEST / "mlx-sys" / "build.rs")
    STAMP.write_text(want)
    print(f"patched MLX crates written to {DEST}")


if __name__ == "__main__":
    main()
