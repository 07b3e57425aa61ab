//! lmspec's own MLX primitives for the CPU (`engine/core/cpu/kernels.cpp`):
//! a quantized matrix product over MLX's affine layout, its dequantization,
//! RMSNorm, RoPE and attention. Each returns a lazy MLX array like any MLX
//! op; the work runs when the graph is evaluated, on a pool of threads,
//! with AVX-512, AVX2 or scalar code picked at run time.
//!
//! MLX's own CPU backend runs the quantized product one value at a time on
//! one thread, and RMSNorm, RoPE and attention as graphs of 10–40 small
//! primitives each; a decode step is dominated by both. The ops in
//! [`crate::ops`] use these kernels when [`enabled`] says so (the default
//! device is the CPU and `LMSPEC_CPU_KERNELS` is not `off`) and fall back to
//! MLX otherwise (a GPU, other dtypes, options the kernels do not cover).
//!
//! Environment: `LMSPEC_CPU_KERNELS` = `off` (MLX's ops), `scalar`, `avx2`
//! or `avx512` (at most that instruction set); `LMSPEC_THREADS` = threads
//! (default: the machine's logical cores).
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

extern "C" {
    fn lmspec_cpu_level() -> c_int;
    fn lmspec_weight_arena(
        outs: *mut *mut c_void,
        ins: *const *const c_void,
        n: usize,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn lmspec_arena_bytes() -> i64;
    fn lmspec_data_ptr(a: *const c_void) -> *const c_void;
    fn lmspec_cpu_threads() -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn lmspec_qmatmul(
        out: *mut *mut c_void,
        x: *const c_void,
        w: *const c_void,
        scales: *const c_void,
        biases: *const c_void,
        group: c_int,
        bits: c_int,
        act: c_int,
        bias_of_scale: f32,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn lmspec_glu(
        out: *mut *mut c_void,
        gate: *const c_void,
        up: *const c_void,
        kind: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn lmspec_matvec(
        out: *mut *mut c_void,
        x: *const c_void,
        wt: *const c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn lmspec_dequantize(
        out: *mut *mut c_void,
        w: *const c_void,
        scales: *const c_void,
        biases: *const c_void,
        group: c_int,
        bits: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn lmspec_rms_norm(
        out: *mut *mut c_void,
        x: *const c_void,
        w: *const c_void,
        eps: f32,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn lmspec_rope(
        out: *mut *mut c_void,
        x: *const c_void,
        dims: c_int,
        traditional: c_int,
        base: f32,
        scale: f32,
        offsets: *const c_int,
        n_offsets: usize,
        freqs: *const c_void,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn lmspec_attention(
        out: *mut *mut c_void,
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        scale: f32,
        causal: c_int,
        firsts: *const c_int,
        n_firsts: usize,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// The instruction set the kernels use on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Scalar,
    Avx2,
    Avx512,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

/// The path the kernels take (`LMSPEC_CPU_KERNELS` may lower it).
pub fn level() -> Level {
    // SAFETY: a plain query of the library's state.
    match unsafe { lmspec_cpu_level() } {
        2 => Level::Avx512,
        1 => Level::Avx2,
        _ => Level::Scalar,
    }
}

/// Threads the kernels split their work over.
pub fn threads() -> usize {
    // SAFETY: a plain query; the pool starts on first use.
    unsafe { lmspec_cpu_threads() }.max(1) as usize
}

fn switched_off() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var("LMSPEC_CPU_KERNELS").is_ok_and(|v| v == "off"))
}

thread_local! {
    static DIFFERENTIATING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a forward that will be differentiated) with MLX's own ops: the
/// kernels have no vector-Jacobian products.
pub fn while_differentiating<T>(f: impl FnOnce() -> T) -> T {
    let before = DIFFERENTIATING.with(|c| c.replace(true));
    let out = f();
    DIFFERENTIATING.with(|c| c.set(before));
    out
}

/// Whether ops should use these kernels now: the default device is the
/// CPU, they are not switched off, and no gradient is being traced.
pub fn enabled() -> bool {
    !switched_off() && !differentiating() && crate::runtime::default_device() == "cpu"
}

/// Whether a forward that will be differentiated is running (see
/// [`while_differentiating`]): lmspec's own kernels, CPU or GPU, have no
/// vector-Jacobian products.
pub fn differentiating() -> bool {
    DIFFERENTIATING.with(|c| c.get())
}

/// Which quantized widths the product and dequantization take (MLX's affine
/// widths). 4 and 8 bits have vector code; the others run scalar.
pub fn supports_bits(bits: i32) -> bool {
    matches!(bits, 2 | 3 | 4 | 5 | 6 | 8)
}

fn raw(a: &Array) -> *const c_void {
    a.as_ptr().ctx as *const c_void
}

/// Copies of evaluated arrays in one mapping of their own, aligned to 2 MB
/// and advised for transparent huge pages (`madvise(MADV_HUGEPAGE)`), each
/// copy on a 64-byte boundary; the mapping goes when its last copy does.
/// `None` where the system gives no such memory (huge pages switched off).
/// The bytes live outside MLX's allocator: [`arena_bytes`] counts them.
pub fn weight_arena(arrays: &[&Array]) -> Result<Option<Vec<Array>>, Exception> {
    for a in arrays {
        a.eval()?;
    }
    let ins: Vec<*const c_void> = arrays.iter().map(|a| raw(a)).collect();
    let mut outs: Vec<*mut c_void> = vec![std::ptr::null_mut(); arrays.len()];
    let mut err = [0 as c_char; 512];
    // SAFETY: `ins` holds live, evaluated arrays; the C side fills every
    // entry of `outs` with a new array on success (rc 0) and none otherwise.
    let rc = unsafe {
        lmspec_weight_arena(
            outs.as_mut_ptr(),
            ins.as_ptr(),
            ins.len(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    match rc {
        0 => Ok(Some(
            outs.into_iter()
                // SAFETY: each entry is a new `mlx::core::array*` we own.
                .map(|p| unsafe { Array::from_ptr(mlx_sys::mlx_array { ctx: p }) })
                .collect(),
        )),
        2 => Ok(None),
        _ => {
            // SAFETY: the C side writes a NUL-terminated message into `err`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            Err(Exception::custom(format!("cpu kernel: {msg}")))
        }
    }
}

/// Where evaluated `a`'s data starts (arrays that share a buffer share it).
pub fn data_ptr(a: &Array) -> Result<usize, Exception> {
    a.eval()?;
    // SAFETY: `a` is a live, evaluated array; the pointer is only compared.
    Ok(unsafe { lmspec_data_ptr(raw(a)) } as usize)
}

/// Whether `a`'s elements lie in row-major order from its data pointer.
pub fn row_contiguous(a: &Array) -> bool {
    let mut row = false;
    // SAFETY: `a` is a live array; the call writes one bool.
    let rc = unsafe { mlx_sys::_mlx_array_is_row_contiguous(&mut row, a.as_ptr()) };
    rc == 0 && row
}

/// Bytes that [`weight_arena`] mappings hold now.
pub fn arena_bytes() -> u64 {
    // SAFETY: reads an atomic counter.
    unsafe { lmspec_arena_bytes() }.max(0) as u64
}

/// Runs one constructor of the C side; its message becomes the error.
fn call(f: impl FnOnce(*mut *mut c_void, *mut c_char, usize) -> c_int) -> Result<Array, Exception> {
    call_if(f)?.ok_or_else(|| Exception::custom("cpu kernel: the kernel does not apply"))
}

/// As [`call`], where the C side answers 2 (and no array) when its kernel
/// does not apply to these inputs.
fn call_if(
    f: impl FnOnce(*mut *mut c_void, *mut c_char, usize) -> c_int,
) -> Result<Option<Array>, Exception> {
    let mut out: *mut c_void = std::ptr::null_mut();
    let mut err = [0 as c_char; 512];
    let rc = f(&mut out, err.as_mut_ptr(), err.len());
    if rc == 2 && out.is_null() {
        return Ok(None);
    }
    if rc != 0 || out.is_null() {
        // SAFETY: the C side writes a NUL-terminated message into `err`.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        return Err(Exception::custom(format!("cpu kernel: {msg}")));
    }
    // SAFETY: `out` is a new `mlx::core::array*`; the Array takes ownership.
    Ok(Some(unsafe {
        Array::from_ptr(mlx_sys::mlx_array { ctx: out })
    }))
}

/// How the quantized product treats the activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// float32, as MLX's `quantized_matmul` (mlx-lm's numerics).
    #[default]
    Float,
    /// Quantized to int8 per block, integer dot products, as llama.cpp's CPU
    /// kernels do (blocks of 32 with a float16 scale against float16-scaled
    /// weights, its Q8_0/Q8_1; of 256 with a float32 scale against
    /// float32-scaled weights, its Q8_K for K-quants). Every width; groups
    /// of 16 or multiples of 32. A tanh-GELU gate (`glu`) then takes
    /// llama.cpp's float16-table GELU ([`geglu_f16`]).
    Int8,
    /// Quantized to 16 bits per block of 32 (the nearest step of the
    /// block's largest magnitude / 32512, held as two int8 values: the
    /// nearest 127th, then the remainder in 256ths), integer dot products
    /// of both bytes: within a 65024th of the block's largest magnitude of
    /// float32, at close to int8's speed. The bias terms and everything
    /// else are float32 (a tanh-GELU `glu` in its vector sigmoid form,
    /// [`geglu_sigmoid`]).
    Int16,
}

impl Activations {
    pub fn parse(s: &str) -> Option<Activations> {
        match s {
            "float" | "f32" => Some(Activations::Float),
            "int8" | "q8" => Some(Activations::Int8),
            "int16" | "q16" => Some(Activations::Int16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activations::Float => "float",
            Activations::Int8 => "int8",
            Activations::Int16 => "int16",
        }
    }
}

thread_local! {
    static BUILD_ACTIVATIONS: std::cell::Cell<Activations> =
        const { std::cell::Cell::new(Activations::Float) };
}

/// Runs `f` (a model's plan being built) with `a` as the activations its
/// quantized products take.
pub fn with_activations<T>(a: Activations, f: impl FnOnce() -> T) -> T {
    let before = BUILD_ACTIVATIONS.with(|c| c.replace(a));
    let out = f();
    BUILD_ACTIVATIONS.with(|c| c.set(before));
    out
}

/// The activations of the plan being built (see [`with_activations`]).
pub fn build_activations() -> Activations {
    BUILD_ACTIVATIONS.with(|c| c.get())
}

/// `x @ dequantize(w)ᵀ` for float32 `x [..., K]` and MLX affine-quantized
/// `w [N, K * bits / 32]` (uint32) with `scales`/`biases` `[N, K / group]`:
/// `[..., N]` float32, computed without expanding `w`.
pub fn quantized_matmul(
    x: &Array,
    w: &Array,
    scales: &Array,
    biases: &Array,
    group: i32,
    bits: i32,
    activations: Activations,
) -> Result<Array, Exception> {
    quantized_matmul_tied(x, w, scales, biases, group, bits, activations, None)
}

/// [`quantized_matmul`], where `bias_of_scale` may say that every bias is
/// that multiple of its group's scale (see [`tied_biases`]): the kernel then
/// computes the biases from the scales and reads none.
#[allow(clippy::too_many_arguments)]
pub fn quantized_matmul_tied(
    x: &Array,
    w: &Array,
    scales: &Array,
    biases: &Array,
    group: i32,
    bits: i32,
    activations: Activations,
    bias_of_scale: Option<f32>,
) -> Result<Array, Exception> {
    let act: c_int = match activations {
        Activations::Float => 0,
        Activations::Int8 => 1,
        Activations::Int16 => 2,
    };
    let tied = bias_of_scale.filter(|&m| m != 0.0).unwrap_or(0.0);
    // SAFETY: the pointers are live arrays; the C side copies what it keeps.
    call(|o, e, n| unsafe {
        lmspec_qmatmul(
            o,
            raw(x),
            raw(w),
            raw(scales),
            raw(biases),
            group,
            bits,
            act,
            tied,
            e,
            n,
        )
    })
}

/// `-2^(bits - 1)` where every bias is exactly that multiple of its
/// group's scale, as in GGUF's Q4_0, Q5_0, Q8_0, Q3_K and Q6_K
/// (`d * (q - k)` held as `d * q - k d`), else `None`. One pass over the
/// scales and biases.
pub fn tied_biases(scales: &Array, biases: &Array, bits: i32) -> Result<Option<f32>, Exception> {
    if !(1..=8).contains(&bits) || scales.shape() != biases.shape() {
        return Ok(None);
    }
    let k = -((1 << (bits - 1)) as f32);
    let want = mlx_rs::ops::multiply(&scales.as_dtype(Dtype::Float32)?, Array::from_f32(k))?;
    Ok(biases
        .as_dtype(Dtype::Float32)?
        .eq_values(&want)?
        .then_some(k))
}

/// `x @ wt` for float32 `x [..., K]` and a dense weight `wt [K, N]` that is
/// the transpose view of an evaluated row-major `[N, K]` array (how linear
/// layers keep dense weights): each output a dot product over one row of
/// the weight, read in order. `None` where `wt` is not such a view.
pub fn dense_matmul(x: &Array, wt: &Array) -> Result<Option<Array>, Exception> {
    // SAFETY: as in `quantized_matmul`.
    call_if(|o, e, n| unsafe { lmspec_matvec(o, raw(x), raw(wt), e, n) })
}

/// `silu(gate) * up` for float32 arrays of one shape (mlx-lm's `swiglu`).
pub fn swiglu(gate: &Array, up: &Array) -> Result<Array, Exception> {
    // SAFETY: as in `quantized_matmul`.
    call(|o, e, n| unsafe { lmspec_glu(o, raw(gate), raw(up), 0, e, n) })
}

/// `gelu(gate) * up` for float32 arrays of one shape, with llama.cpp's GELU:
/// the tanh approximation at `gate` rounded to float16, itself rounded to
/// float16 (ggml's lookup table); 0 at `gate <= -10`, `gate` at `>= 10`.
pub fn geglu_f16(gate: &Array, up: &Array) -> Result<Array, Exception> {
    // SAFETY: as in `quantized_matmul`.
    call(|o, e, n| unsafe { lmspec_glu(o, raw(gate), raw(up), 1, e, n) })
}

/// `gelu(gate) * up` for float32 arrays of one shape, with MLX's tanh
/// approximation evaluated as MLX's compiled CPU graph of mlx-rs's formula
/// does (the same float32 operations in the same order, libm's `powf` and
/// `tanhf`): the same bits, on the kernels' threads.
pub fn geglu_tanh(gate: &Array, up: &Array) -> Result<Array, Exception> {
    // SAFETY: as in `quantized_matmul`.
    call(|o, e, n| unsafe { lmspec_glu(o, raw(gate), raw(up), 2, e, n) })
}

/// `gelu(gate) * up` for float32 arrays of one shape: MLX's tanh
/// approximation as the same function in its sigmoid form, `x /
/// (1 + exp(-2 y))`, vectorized (within 1e-5 of the exact function,
/// relatively; not MLX's bits).
pub fn geglu_sigmoid(gate: &Array, up: &Array) -> Result<Array, Exception> {
    // SAFETY: as in `quantized_matmul`.
    call(|o, e, n| unsafe { lmspec_glu(o, raw(gate), raw(up), 3, e, n) })
}

/// `w * scale + bias` as float32 `[N, K]`.
pub fn dequantize(
    w: &Array,
    scales: &Array,
    biases: &Array,
    group: i32,
    bits: i32,
) -> Result<Array, Exception> {
    // SAFETY: as in `quantized_matmul`.
    call(|o, e, n| unsafe {
        lmspec_dequantize(o, raw(w), raw(scales), raw(biases), group, bits, e, n)
    })
}

/// `x * rsqrt(mean(x²) + eps) (* weight)` over the last axis (float32).
pub fn rms_norm(x: &Array, weight: Option<&Array>, eps: f32) -> Result<Array, Exception> {
    let w = weight.map_or(std::ptr::null(), raw);
    // SAFETY: as in `quantized_matmul`; a null weight means none.
    call(|o, e, n| unsafe { lmspec_rms_norm(o, raw(x), w, eps, e, n) })
}

/// Rotary embedding of `x [B, H, T, D]` (float32) at positions
/// `offset + t`, as MLX's `fast::rope` computes it: one offset for every
/// row, or one per row (sequences at their own positions; a row's values
/// are those it gets alone).
pub fn rope(
    x: &Array,
    dims: i32,
    traditional: bool,
    base: Option<f32>,
    scale: f32,
    offsets: &[i32],
    freqs: Option<&Array>,
) -> Result<Array, Exception> {
    let f = freqs.map_or(std::ptr::null(), raw);
    let base = base.unwrap_or(10_000.0);
    // SAFETY: as in `quantized_matmul`; null freqs means `base`; the
    // offsets are read during the call (the primitive keeps a copy).
    call(|o, e, n| unsafe {
        lmspec_rope(
            o,
            raw(x),
            dims,
            traditional as c_int,
            base,
            scale,
            offsets.as_ptr(),
            offsets.len(),
            f,
            e,
            n,
        )
    })
}

/// `softmax(scale · q kᵀ) v` with grouped-query heads, optionally causal
/// (query `i` sees keys up to `i + Tk − Tq`); float32 `[B, H, T, D]` inputs.
/// `firsts`: none, or for each row of the batch the first key it sees (the
/// keys before it are padding); a row's values are those of its keys from
/// there on alone.
pub fn attention(
    q: &Array,
    k: &Array,
    v: &Array,
    scale: f32,
    causal: bool,
    firsts: &[i32],
) -> Result<Array, Exception> {
    // SAFETY: as in `quantized_matmul`; the firsts are read during the call
    // (the primitive keeps a copy).
    call(|o, e, n| unsafe {
        lmspec_attention(
            o,
            raw(q),
            raw(k),
            raw(v),
            scale,
            causal as c_int,
            firsts.as_ptr(),
            firsts.len(),
            e,
            n,
        )
    })
}

/// Whether every array is float32 (the kernels' dtype).
pub fn all_f32(arrays: &[&Array]) -> bool {
    arrays.iter().all(|a| a.dtype() == Dtype::Float32)
}

#[cfg(test)]
#[path = "cpu_kernels_tests.rs"]
mod tests;
