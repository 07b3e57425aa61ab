//! Facts about the MLX runtime this process runs on: version, backend,
//! default device, which BLAS serves MLX's CPU matmuls, and a quick speed
//! figure. Used by `lmspec doctor`.
use std::ffi::CStr;
use std::time::Instant;

use mlx_rs::error::Exception;
use mlx_rs::Array;

/// MLX's version string.
pub fn mlx_version() -> String {
    // SAFETY: mlx_version fills a fresh mlx_string that we read and free.
    unsafe {
        let mut s = mlx_sys::mlx_string_new();
        if mlx_sys::mlx_version(&mut s) != 0 {
            return "unknown".into();
        }
        let data = mlx_sys::mlx_string_data(s);
        let out = if data.is_null() {
            "unknown".into()
        } else {
            CStr::from_ptr(data).to_string_lossy().into_owned()
        };
        mlx_sys::mlx_string_free(s);
        out
    }
}

/// Whether libmlx was built with a CUDA backend and sees a GPU.
pub fn cuda_available() -> bool {
    let mut avail = false;
    // SAFETY: writes one bool.
    let rc = unsafe { mlx_sys::mlx_cuda_is_available(&mut avail) };
    rc == 0 && avail
}

/// Number of GPU devices MLX sees.
pub fn gpu_count() -> i32 {
    let mut n = 0;
    // SAFETY: writes one int.
    let rc = unsafe { mlx_sys::mlx_device_count(&mut n, mlx_sys::mlx_device_type__MLX_GPU) };
    if rc == 0 {
        n
    } else {
        0
    }
}

/// The default device's kind ("cpu" or "gpu").
pub fn default_device() -> &'static str {
    // SAFETY: the device handle is created, queried and freed here.
    unsafe {
        let mut dev = mlx_sys::mlx_device_new();
        let mut kind = mlx_sys::mlx_device_type__MLX_CPU;
        let ok = mlx_sys::mlx_get_default_device(&mut dev) == 0
            && mlx_sys::mlx_device_get_type(&mut kind, dev) == 0;
        mlx_sys::mlx_device_free(dev);
        match (ok, kind) {
            (true, mlx_sys::mlx_device_type__MLX_GPU) => "gpu",
            (true, _) => "cpu",
            _ => "unknown",
        }
    }
}

/// The variable that names MLX's default device for a run (`cpu` or
/// `gpu`), e.g. to run on the CPU of a machine with a GPU.
pub const DEVICE_ENV: &str = "LMSPEC_DEVICE";

/// Makes `$LMSPEC_DEVICE` MLX's default device when it is set; an error
/// names the variable and the values it takes.
pub fn use_device_from_env() -> Result<(), String> {
    let Some(value) = std::env::var_os(DEVICE_ENV) else {
        return Ok(());
    };
    let device = match value.to_str() {
        Some("cpu") => mlx_rs::Device::cpu(),
        Some("gpu") if gpu_count() > 0 => mlx_rs::Device::gpu(),
        Some("gpu") => return Err(format!("{DEVICE_ENV}=gpu: this MLX sees no GPU")),
        _ => {
            return Err(format!(
                "{DEVICE_ENV}={}: expected cpu or gpu",
                value.to_string_lossy()
            ))
        }
    };
    mlx_rs::Device::set_default(&device);
    Ok(())
}

/// The shared library that provides `cblas_sgemm` to MLX (first definition
/// in the process's global symbol scope), or `None` if none is loaded.
pub fn blas_library() -> Option<String> {
    // SAFETY: dlsym/dladdr only read the loader's tables.
    unsafe {
        let sym = libc::dlsym(libc::RTLD_DEFAULT, c"cblas_sgemm".as_ptr());
        if sym.is_null() {
            return None;
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(sym, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let path = CStr::from_ptr(info.dli_fname)
            .to_string_lossy()
            .into_owned();
        Some(
            std::fs::canonicalize(&path)
                .map(|p| p.display().to_string())
                .unwrap_or(path),
        )
    }
}

/// A short name for a BLAS library path.
pub fn blas_kind(path: &str) -> &'static str {
    let lower = path.to_ascii_lowercase();
    if lower.contains("openblas") {
        "OpenBLAS"
    } else if lower.contains("mkl") {
        "MKL"
    } else if lower.contains("blis") {
        "BLIS"
    } else if lower.contains("libblas") {
        "reference BLAS (netlib)"
    } else {
        "unknown BLAS"
    }
}

/// GFLOP/s of an `n`x`n` float32 matmul on the default device (median of
/// `reps` timed runs after one warm-up).
pub fn matmul_gflops(n: i32, reps: usize) -> Result<f64, Exception> {
    let a = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?;
    let b = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?;
    a.eval()?;
    b.eval()?;
    mlx_rs::ops::matmul(&a, &b)?.eval()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        mlx_rs::ops::matmul(&a, &b)?.eval()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|x, y| x.total_cmp(y));
    let t = times[times.len() / 2];
    Ok(2.0 * (n as f64).powi(3) / t / 1e9)
}

/// Adds two small arrays and reads the result back: the binding works.
pub fn smoke() -> Result<Vec<f32>, Exception> {
    let a = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]);
    let b = Array::from_slice(&[10.0f32, 20.0, 30.0], &[3]);
    let c = mlx_rs::ops::add(&a, &b)?;
    c.eval()?;
    Ok(c.as_slice::<f32>().to_vec())
}

/// MLX's graph of `outputs` in Graphviz DOT form (`mx.export_to_dot`).
pub fn graph_dot(outputs: &[&Array]) -> Result<String, Exception> {
    let handles: Vec<mlx_sys::mlx_array> = outputs.iter().map(|a| a.as_ptr()).collect();
    // SAFETY: the vector borrows the arrays' handles for the call and is
    // freed after; the memory stream is closed before its buffer is read,
    // and the buffer is freed with `free` as open_memstream requires.
    unsafe {
        let vec = mlx_sys::mlx_vector_array_new_data(handles.as_ptr(), handles.len());
        let namer = mlx_sys::mlx_node_namer_new();
        let mut buf: *mut libc::c_char = std::ptr::null_mut();
        let mut len: libc::size_t = 0;
        let stream = libc::open_memstream(&mut buf, &mut len);
        let rc = if stream.is_null() {
            -1
        } else {
            let rc = mlx_sys::mlx_export_to_dot(stream.cast(), namer, vec);
            libc::fclose(stream);
            rc
        };
        mlx_sys::mlx_node_namer_free(namer);
        mlx_sys::mlx_vector_array_free(vec);
        let text = if buf.is_null() {
            String::new()
        } else {
            let bytes = std::slice::from_raw_parts(buf.cast::<u8>(), len);
            let text = String::from_utf8_lossy(bytes).into_owned();
            libc::free(buf.cast());
            text
        };
        if rc != 0 {
            return Err(Exception::custom("mlx_export_to_dot failed"));
        }
        Ok(text)
    }
}

/// How many primitives of each kind a DOT graph from [`graph_dot`] holds
/// (the operations MLX runs to evaluate it, before its own fusion).
pub fn primitive_census(dot: &str) -> std::collections::BTreeMap<String, usize> {
    let mut census = std::collections::BTreeMap::new();
    for line in dot.lines().filter(|l| l.contains("shape=rectangle")) {
        if let Some(rest) = line.split("label =\"").nth(1) {
            let name = rest.split('"').next().unwrap_or("");
            *census.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    census
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Path of a loaded shared library whose file name contains `fragment`
/// (read from `/proc/self/maps`).
pub fn loaded_library(fragment: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            std::path::Path::new(p)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().contains(fragment))
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_adds_on_cpu() {
        assert_eq!(smoke().unwrap(), vec![11.0, 22.0, 33.0]);
        let m = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let p = mlx_rs::ops::matmul(&m, &m).unwrap();
        p.eval().unwrap();
        assert_eq!(p.as_slice::<f32>(), &[7.0, 10.0, 15.0, 22.0]);
    }

    #[test]
    fn version_and_blas_are_reported() {
        assert!(mlx_version().starts_with("0."), "{}", mlx_version());
        let blas = blas_library().expect("MLX's CPU backend links a BLAS");
        assert_ne!(blas_kind(&blas), "unknown BLAS", "{blas}");
    }

    #[test]
    fn graph_census_counts_primitives() {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let b = mlx_rs::ops::add(mlx_rs::ops::exp(&a).unwrap(), &a).unwrap();
        let c = mlx_rs::ops::matmul(&b, &b).unwrap();
        let census = primitive_census(&graph_dot(&[&c]).unwrap());
        let expected: Vec<(&str, usize)> = vec![("Add", 1), ("Exp", 1), ("Matmul", 1)];
        let got: Vec<(&str, usize)> = census.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(got, expected);
        c.eval().unwrap();
        assert!(primitive_census(&graph_dot(&[&c]).unwrap()).is_empty());
    }
}
