//! lmspec's own GPU kernels: CUDA source compiled at run time by MLX's
//! `fast::cuda_kernel` (NVRTC), for one row of activations (a decode step).
//!
//! A decode step on the GPU is bound by the host: MLX spends about 2 µs
//! encoding each kernel (docs/benchmarks.md, "Where a 1B step's host time
//! goes"), and a layer-by-layer graph launches one kernel per norm, product,
//! gated unit and residual add. A [`ProjKernel`] does a run of these in one
//! kernel: an optional RMSNorm of its input, the products of one or more
//! weights (dense or MLX's affine-quantized layout) with the normalised row,
//! and an optional epilogue — a gated unit over two products or a residual
//! added to one. The plan ([`crate::plan`]) finds such runs in the graph and
//! runs them through a kernel when a step has one row; other steps run the
//! ops as the graph lists them.
//!
//! Each block first stages the row in shared memory as float32 (normalised
//! and rounded to the activations' dtype as MLX's `rms_norm` rounds it);
//! each product is summed in float32 and rounded, and the epilogue rounds as
//! the unfused ops do: only the order of the float32 sums differs.
//!
//! Environment: `LMSPEC_GPU_KERNELS` = `auto` (the default) or `on` (the
//! kernels on a GPU), `off` (the ops as listed), `groups` (groups formed on
//! any device, running their ops);
//! `LMSPEC_KERNEL_DUMP=1` prints each kernel's source as it is made.
use std::ffi::CString;
use std::fmt::Write as _;

use mlx_rs::error::Exception;
use mlx_rs::{Array, Dtype};

use crate::weights::Param;

/// Whether a plan runs kernel groups through these kernels: on a GPU,
/// unless `LMSPEC_GPU_KERNELS=off`. `auto` (the default) and `on` agree
/// for every model size: a 1B-parameter model's step is bound by the
/// host's encoding, which the kernels cut, and an 8B-parameter model's by
/// the weights' bandwidth, where the kernels read as fast as MLX's
/// matrix-vector kernels (H100: 1.02x–1.05x; docs/benchmarks.md).
pub fn enabled() -> bool {
    let setting = std::env::var("LMSPEC_GPU_KERNELS").ok();
    policy(
        setting.as_deref(),
        crate::runtime::default_device() == "gpu",
    )
}

/// The values `LMSPEC_GPU_KERNELS` takes.
pub const SETTINGS: [&str; 4] = ["auto", "on", "off", "groups"];

/// [`enabled`] for a setting and a device.
fn policy(setting: Option<&str>, gpu: bool) -> bool {
    gpu && setting != Some("off")
}

/// Whether the plan should form kernel groups: where [`enabled`], or
/// anywhere under `LMSPEC_GPU_KERNELS=groups` or [`with_grouping`] (the
/// groups then run their ops as listed: how the CPU tests check them).
pub fn grouping() -> bool {
    enabled() || FORCED.get() || std::env::var("LMSPEC_GPU_KERNELS").is_ok_and(|v| v == "groups")
}

thread_local! {
    static FORCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a model load) with kernel groups formed on any device, as
/// `LMSPEC_GPU_KERNELS=groups` does for the whole process.
pub fn with_grouping<T>(f: impl FnOnce() -> T) -> T {
    let before = FORCED.replace(true);
    let out = f();
    FORCED.set(before);
    out
}

/// What a kernel does with its products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// One output per weight.
    Split,
    /// `act(gate) * up` over two weights of equal rows: one output.
    Glu(GluAct),
    /// `residual + product` over one weight: one output.
    Residual,
}

/// The gate activations a kernel's gated unit computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GluAct {
    /// `g · sigmoid(g)` (SwiGLU).
    Silu,
    /// The tanh approximation of GELU (GeGLU).
    GeluTanh,
}

/// Values one 16-byte load of a weight row holds.
fn per_load(p: &Param) -> Option<i32> {
    match p {
        Param::Dense(w) => match w.dtype() {
            Dtype::Float32 => Some(4),
            Dtype::Float16 | Dtype::Bfloat16 => Some(8),
            _ => None,
        },
        Param::Quantized { bits, .. } if matches!(bits, 2 | 4 | 8) => Some(128 / bits),
        Param::Quantized { .. } => None,
    }
}

/// The activations' dtype a weight's kernel works in (a dense weight's own,
/// a quantized one's scales'), if the kernels take it.
pub fn act_dtype(p: &Param) -> Option<Dtype> {
    let d = match p {
        Param::Dense(w) => w.dtype(),
        Param::Quantized { scales, .. } => scales.dtype(),
    };
    matches!(d, Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16).then_some(d)
}

/// The input features of a 2-D weight the kernels take: `[out, in]` dense,
/// or packed quantized whose groups hold whole loads; `None` otherwise.
pub fn input_features(p: &Param) -> Option<i32> {
    let v = per_load(p)?;
    let k = match p {
        Param::Dense(w) if w.ndim() == 2 => w.shape()[1],
        Param::Quantized {
            w,
            scales,
            group_size,
            bits,
            ..
        } if w.ndim() == 2 && scales.ndim() == 2 && group_size % v == 0 => {
            let k = w.shape()[1] * 32 / bits;
            (scales.shape()[1] * group_size == k).then_some(k)?
        }
        _ => return None,
    };
    // Each lane's load must be whole and the staged row fit in shared memory.
    (k > 0 && k % v == 0 && k <= MAX_FEATURES).then_some(k)
}

/// The most input features a kernel stages (float32 in shared memory).
const MAX_FEATURES: i32 = 48 * 1024;

/// What a weight must share with the others of one kernel: its
/// representation (dense dtype, or bits and group size), input features and
/// activations' dtype; `None` where the kernels do not take it.
pub fn weight_kind(p: &Param) -> Option<String> {
    let k = input_features(p)?;
    let d = act_dtype(p)?;
    Some(match p {
        Param::Dense(a) => format!("dense {:?} {k} {d:?}", a.dtype()),
        Param::Quantized {
            group_size, bits, ..
        } => format!("q{bits}/{group_size} {k} {d:?}"),
    })
}

/// Output rows of a 2-D weight.
pub fn output_rows(p: &Param) -> i32 {
    match p {
        Param::Dense(w) | Param::Quantized { w, .. } => w.shape()[0],
    }
}

/// How a [`Epilogue::Split`] output leaves the kernel: as the product's
/// row, or split into heads `[B, H, 1, D]` (one position: the same memory
/// order), rotated by a RoPE where given.
#[derive(Debug, Clone, Default)]
pub struct OutForm {
    /// Heads and features per head.
    pub heads: Option<(i32, i32)>,
    pub rope: Option<RopeForm>,
}

/// A RoPE as MLX's `fast::rope` applies it to one position: the first
/// `dims` features of each head rotated (as halves, or as interleaved pairs
/// when `traditional`) by angles `scale · position · inv_freq`, where
/// `inv_freq_j = base^(-j / (dims / 2))` or `1 / freqs_j`.
#[derive(Debug, Clone)]
pub struct RopeForm {
    pub dims: i32,
    pub traditional: bool,
    /// `log2(base)`, or `None` with `freqs`.
    pub log2_base: Option<f32>,
    pub scale: f32,
    /// float32 `[dims / 2]`.
    pub freqs: Option<Array>,
}

/// One compiled kernel configuration with its weights.
#[derive(Debug)]
pub struct ProjKernel {
    handle: Handle,
    /// Inputs after the row (and residual): norm weight, then each weight's arrays.
    constants: Vec<Array>,
    rows: Vec<i32>,
    /// Each output's heads and features per head, if split.
    heads: Vec<Option<(i32, i32)>>,
    /// Whether the kernel reads the position (a RoPE).
    roped: bool,
    epilogue: Epilogue,
    dtype: Dtype,
    features: i32,
    /// Threads in all (blocks of `WARPS` warps).
    threads: i32,
    /// Whether the row comes as heads, `[B, H, 1, D]` (a `merge_heads` the
    /// kernel stands for).
    heads_row: bool,
}

const WARPS: i32 = 8;

impl ProjKernel {
    /// A kernel over `weights` (all of one kind: [`input_features`] and
    /// [`act_dtype`] agree), with an RMSNorm `(weight, eps)` of the row first
    /// where given. `None` when the kernels do not take this combination.
    pub fn new(
        norm: Option<(Array, f32)>,
        weights: &[Param],
        epilogue: Epilogue,
        forms: &[OutForm],
    ) -> Option<ProjKernel> {
        let first = weights.first()?;
        let features = input_features(first)?;
        let dtype = act_dtype(first)?;
        let kind = weight_kind(first);
        if weights.iter().any(|p| weight_kind(p) != kind) {
            return None;
        }
        let rows: Vec<i32> = weights.iter().map(output_rows).collect();
        match epilogue {
            Epilogue::Glu(_) if weights.len() != 2 || rows[0] != rows[1] => return None,
            Epilogue::Residual if weights.len() != 1 => return None,
            _ => {}
        }
        if let Some((w, _)) = &norm {
            if w.ndim() != 1 || w.shape()[0] != features || w.dtype() != dtype {
                return None;
            }
        }
        let forms: Vec<OutForm> = match epilogue {
            Epilogue::Split if forms.len() == weights.len() => forms.to_vec(),
            Epilogue::Split if forms.is_empty() => vec![OutForm::default(); weights.len()],
            _ if forms.iter().all(|f| f.heads.is_none() && f.rope.is_none()) => {
                vec![OutForm::default()]
            }
            _ => return None,
        };
        let roped = forms.iter().any(|f| f.rope.is_some());
        for (f, &n) in forms.iter().zip(&rows) {
            if let Some((h, d)) = f.heads {
                if h * d != n {
                    return None;
                }
            }
            if let Some(r) = &f.rope {
                let (_, d) = f.heads?;
                let freqs_fit = match (&r.freqs, r.log2_base) {
                    (Some(fr), None) => {
                        fr.dtype() == Dtype::Float32 && fr.size() == (r.dims / 2) as usize
                    }
                    (None, Some(_)) => true,
                    _ => false,
                };
                if !freqs_fit || r.dims <= 0 || r.dims % 2 != 0 || r.dims > d || d % 2 != 0 {
                    return None;
                }
            }
            if roped && n % 2 != 0 {
                return None;
            }
        }
        // Rows per warp: each warp's rows lie in one weight.
        let slots: Vec<i32> = match epilogue {
            Epilogue::Glu(_) => vec![rows[0]],
            _ => rows.clone(),
        };
        let total: i32 = slots.iter().sum();
        let per_warp = rows_per_warp(&slots, roped);
        let warps = total / per_warp;
        let blocks = (warps + WARPS - 1) / WARPS;
        let source = body(&Config {
            dtype,
            features,
            norm_eps: norm.as_ref().map(|(_, e)| *e),
            weights,
            slots: &slots,
            per_warp,
            epilogue,
            forms: &forms,
        });
        let mut inputs = vec!["x".to_string()];
        if epilogue == Epilogue::Residual {
            inputs.push("res".into());
        }
        if roped {
            inputs.push("off".into());
        }
        let mut constants = Vec::new();
        if let Some((w, _)) = norm {
            inputs.push("nw".into());
            constants.push(w);
        }
        for (i, f) in forms.iter().enumerate() {
            if let Some(fr) = f.rope.as_ref().and_then(|r| r.freqs.clone()) {
                inputs.push(format!("f{i}"));
                constants.push(fr);
            }
        }
        for (i, p) in weights.iter().enumerate() {
            match p {
                Param::Dense(w) => {
                    inputs.push(format!("w{i}"));
                    constants.push(w.clone());
                }
                Param::Quantized {
                    w, scales, biases, ..
                } => {
                    inputs.extend([format!("w{i}"), format!("s{i}"), format!("b{i}")]);
                    constants.extend([w.clone(), scales.clone(), biases.clone()]);
                }
            }
        }
        let outputs: Vec<String> = match epilogue {
            Epilogue::Split => (0..weights.len()).map(|i| format!("y{i}")).collect(),
            _ => vec!["y0".into()],
        };
        let name = format!("lmspec_proj_{:016x}", fnv(&source));
        if std::env::var_os("LMSPEC_KERNEL_DUMP").is_some() {
            eprintln!("{name} inputs {inputs:?}\n{source}");
        }
        let header = match first {
            Param::Dense(_) => DENSE_ROWS,
            Param::Quantized { .. } => QUANT_ROWS,
        };
        let handle = Handle::new(&name, &inputs, &outputs, &source, header, features * 4)?;
        Some(ProjKernel {
            handle,
            constants,
            rows: match epilogue {
                Epilogue::Split => rows,
                _ => vec![rows[0]],
            },
            heads: forms.iter().map(|f| f.heads).collect(),
            roped,
            epilogue,
            dtype,
            features,
            threads: blocks * WARPS * 32,
            heads_row: false,
        })
    }

    /// The same kernel reading its row as heads, `[B, H, 1, D]`: for one
    /// position that layout is the merged row's, so the kernel stands for
    /// the `merge_heads` too.
    pub fn reading_heads(mut self) -> ProjKernel {
        self.heads_row = true;
        self
    }

    /// The kernel's outputs for row `x` (and `residual`) at `position`, or
    /// `None` when it does not apply (more than one row, another dtype, a
    /// residual of another shape, a RoPE without one position, a forward
    /// being differentiated).
    pub fn apply(
        &self,
        x: &Array,
        residual: Option<&Array>,
        position: Option<i32>,
    ) -> Result<Option<Vec<Array>>, Exception> {
        let k = match x.shape() {
            [_, h, _, d] if self.heads_row => h * d,
            s => s.last().copied().unwrap_or(0),
        };
        let one_row = x.ndim() >= 1 && x.size() == k as usize;
        if k != self.features || !one_row || x.dtype() != self.dtype {
            return Ok(None);
        }
        // A traced gradient needs the ops (the kernel has no VJP).
        if crate::cpu_kernels::differentiating() {
            return Ok(None);
        }
        let heads_fit = x.ndim() == 3 || self.heads.iter().all(Option::is_none);
        if !heads_fit || (self.roped && position.is_none()) {
            return Ok(None);
        }
        let lead: Vec<i32> = if self.heads_row {
            match x.shape() {
                [b, _, 1, _] => vec![*b, 1],
                _ => return Ok(None),
            }
        } else {
            x.shape()[..x.ndim() - 1].to_vec()
        };
        let off;
        let mut inputs: Vec<&Array> = vec![x];
        if self.epilogue == Epilogue::Residual {
            match residual {
                Some(r) if r.size() == self.rows[0] as usize && r.dtype() == self.dtype => {
                    inputs.push(r)
                }
                _ => return Ok(None),
            }
        }
        if self.roped {
            off = Array::from_slice(&[position.unwrap_or(0)], &[1]);
            inputs.push(&off);
        }
        inputs.extend(self.constants.iter());
        let shapes: Vec<Vec<i32>> = self
            .rows
            .iter()
            .zip(&self.heads)
            .map(|(&n, heads)| match heads {
                // [B, T, H·D] as [B, H, T, D] (T = 1).
                Some((h, d)) => vec![lead[0], *h, lead[1], *d],
                None => lead.iter().copied().chain([n]).collect(),
            })
            .collect();
        self.handle
            .apply(&inputs, &shapes, self.dtype, self.threads)
            .map(Some)
    }
}

/// Rows each warp computes: a RoPE's pairs where one is applied, else up
/// to 4 while every output's rows divide and 2 warps per SM thread slot
/// (of 132 SMs) stay busy.
fn rows_per_warp(slots: &[i32], roped: bool) -> i32 {
    if roped {
        return 2;
    }
    let total: i32 = slots.iter().sum();
    [4, 2]
        .into_iter()
        .find(|r| slots.iter().all(|n| n % r == 0) && total / r >= 2 * WARPS * 132)
        .unwrap_or(1)
}

/// FNV-1a of a string (kernel names: one per distinct source).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn cuda_type(d: Dtype) -> &'static str {
    match d {
        Dtype::Float16 => "__half",
        Dtype::Bfloat16 => "__nv_bfloat16",
        _ => "float",
    }
}

/// The device function of dense weights: rows `row + r * step` (r < R)
/// times the staged row, summed over the warp. A kernel's header holds only
/// the functions it calls: MLX rebuilds and hashes the whole source on every
/// call, so its length is host time per step.
const DENSE_ROWS: &str = r#"
template <typename T, int K, int R>
__device__ __forceinline__ void lm_dense_rows(
    const T* w, int row, int step, const float* xs, int lane, float* acc) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
#pragma unroll 4
  for (int k = lane * V; k < K; k += 32 * V) {
    uint4 raw[R];
#pragma unroll
    for (int r = 0; r < R; ++r)
      raw[r] = *reinterpret_cast<const uint4*>(w + (size_t)(row + r * step) * K + k);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const T* e = reinterpret_cast<const T*>(&raw[r]);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[r] += static_cast<float>(e[j]) * xs[k + j];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
}
"#;

/// The device function of MLX affine-quantized weights, as [`DENSE_ROWS`].
const QUANT_ROWS: &str = r#"
template <typename T, int K, int R, int BITS, int GROUP>
__device__ __forceinline__ void lm_quant_rows(
    const uint32_t* w, const T* s, const T* b, int row, int step, const float* xs,
    int lane, float* acc) {
  constexpr int V = 128 / BITS;
  constexpr int PER_WORD = 32 / BITS;
  constexpr int WORDS = K / PER_WORD;
  constexpr int GROUPS = K / GROUP;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
#pragma unroll 2
  for (int k = lane * V; k < K; k += 32 * V) {
    uint4 raw[R];
#pragma unroll
    for (int r = 0; r < R; ++r)
      raw[r] = *reinterpret_cast<const uint4*>(w + (size_t)(row + r * step) * WORDS + k / PER_WORD);
    float xsum = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) xsum += xs[k + j];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t q[4] = {raw[r].x, raw[r].y, raw[r].z, raw[r].w};
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < PER_WORD; ++j)
          dot += static_cast<float>((q[i] >> (BITS * j)) & MASK) * xs[k + i * PER_WORD + j];
      const int g = (row + r * step) * GROUPS + k / GROUP;
      acc[r] += static_cast<float>(s[g]) * dot + static_cast<float>(b[g]) * xsum;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
}
"#;

struct Config<'a> {
    dtype: Dtype,
    features: i32,
    norm_eps: Option<f32>,
    weights: &'a [Param],
    /// Output rows each warp slot range covers, per weight (one entry for a
    /// gated unit).
    slots: &'a [i32],
    per_warp: i32,
    epilogue: Epilogue,
    forms: &'a [OutForm],
}

/// The kernel body (MLX writes the signature from the input and output
/// names: `x`, `res`, `nw`, `w{i}` / `s{i}` / `b{i}`, `y{i}`).
fn body(c: &Config<'_>) -> String {
    let t = cuda_type(c.dtype);
    let k = c.features;
    let r = c.per_warp;
    let mut s = String::new();
    let _ = writeln!(s, "typedef {t} T;");
    let _ = writeln!(s, "constexpr int K = {k};");
    let _ = writeln!(s, "constexpr int R = {r};");
    let _ = writeln!(s, "constexpr int WARPS = {WARPS};");
    s.push_str(
        "extern __shared__ float xs[];\n\
         __shared__ float red[WARPS];\n\
         const int lane = threadIdx.x & 31;\n\
         const int warp = threadIdx.x >> 5;\n\
         float ss = 0.0f;\n\
         for (int k = threadIdx.x; k < K; k += WARPS * 32) {\n\
           const float v = static_cast<float>(x[k]);\n\
           xs[k] = v;\n\
           ss += v * v;\n\
         }\n",
    );
    if let Some(eps) = c.norm_eps {
        let _ = write!(
            s,
            "for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);\n\
             if (lane == 0) red[warp] = ss;\n\
             __syncthreads();\n\
             float tot = 0.0f;\n\
             for (int i = 0; i < WARPS; ++i) tot += red[i];\n\
             const float inv = rsqrtf(tot / K + {eps:e}f);\n\
             for (int k = threadIdx.x; k < K; k += WARPS * 32) {{\n\
               const T n = static_cast<T>(xs[k] * inv);\n\
               xs[k] = static_cast<float>(nw[k] * n);\n\
             }}\n"
        );
    }
    s.push_str(
        "__syncthreads();\n\
         const int slot = (blockIdx.x * WARPS + warp) * R;\n",
    );
    let rows_call = |i: usize, row: &str| -> String {
        match &c.weights[i] {
            Param::Dense(_) => format!("lm_dense_rows<T, K, R>(w{i}, {row}, xs, lane, "),
            Param::Quantized {
                group_size, bits, ..
            } => format!(
                "lm_quant_rows<T, K, R, {bits}, {group_size}>(w{i}, s{i}, b{i}, {row}, xs, lane, "
            ),
        }
    };
    match c.epilogue {
        Epilogue::Split => {
            let mut start = 0;
            for (i, n) in c.slots.iter().enumerate() {
                let end = start + n;
                let _ = write!(
                    s,
                    "{}if (slot < {end}) {{\n\
                       int row = slot - {start};\n\
                       int step = 1;\n",
                    if i == 0 { "" } else { " else " },
                );
                let form = &c.forms[i];
                let rope = match (&form.rope, form.heads) {
                    (Some(r), Some((_, d))) => {
                        let half = r.dims / 2;
                        let (first, stride) = if r.traditional {
                            ("2 * j", "1".to_string())
                        } else {
                            ("j", half.to_string())
                        };
                        let _ = write!(
                            s,
                            "const int pair = row / 2;\n\
                             const int h = pair / {hd};\n\
                             const int j = pair % {hd};\n\
                             const bool rot = j < {half};\n\
                             if (rot) {{ row = h * {d} + {first}; step = {stride}; }}\n\
                             else {{ row = h * {d} + {dims} + 2 * (j - {half}); }}\n",
                            hd = d / 2,
                            dims = r.dims,
                        );
                        let inv = match r.log2_base {
                            Some(lb) => format!(
                                "exp2f(-(static_cast<float>(j) / static_cast<float>({half})) * {lb:e}f)"
                            ),
                            None => format!("static_cast<float>(1.0 / static_cast<double>(f{i}[j]))"),
                        };
                        format!(
                            "if (rot) {{\n\
                               const float a = static_cast<float>(static_cast<T>(acc[0]));\n\
                               const float b = static_cast<float>(static_cast<T>(acc[1]));\n\
                               const float th = ({scale:e}f * static_cast<float>(off[0])) * {inv};\n\
                               const float co = cosf(th);\n\
                               const float si = sinf(th);\n\
                               y{i}[row] = static_cast<T>(a * co - b * si);\n\
                               y{i}[row + step] = static_cast<T>(a * si + b * co);\n\
                             }} else\n",
                            scale = r.scale,
                        )
                    }
                    _ => String::new(),
                };
                let _ = write!(
                    s,
                    "float acc[R];\n\
                     {}acc);\n\
                     if (lane == 0) {{\n\
                       {rope}for (int r = 0; r < R; ++r) y{i}[row + r * step] = static_cast<T>(acc[r]);\n\
                     }}\n\
                     }}",
                    rows_call(i, "row, step"),
                );
                start = end;
            }
            s.push('\n');
        }
        Epilogue::Residual => {
            let _ = write!(
                s,
                "if (slot < {n}) {{\n\
                   float acc[R];\n\
                   {}acc);\n\
                   if (lane == 0)\n\
                     for (int r = 0; r < R; ++r) {{\n\
                       const T p = static_cast<T>(acc[r]);\n\
                       y0[slot + r] = static_cast<T>(static_cast<float>(res[slot + r]) + static_cast<float>(p));\n\
                     }}\n\
                 }}\n",
                rows_call(0, "slot, 1"),
                n = c.slots[0],
            );
        }
        Epilogue::Glu(act) => {
            let gate = match act {
                GluAct::Silu => {
                    "const T sg = static_cast<T>(1.0f / (1.0f + expf(-g)));\n\
                     const float a = static_cast<float>(static_cast<T>(g * static_cast<float>(sg)));\n"
                }
                GluAct::GeluTanh => {
                    "const float a = static_cast<float>(static_cast<T>(0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))));\n"
                }
            };
            let _ = write!(
                s,
                "if (slot < {n}) {{\n\
                   float ag[R];\n\
                   float au[R];\n\
                   {}ag);\n\
                   {}au);\n\
                   if (lane == 0)\n\
                     for (int r = 0; r < R; ++r) {{\n\
                       const float g = static_cast<float>(static_cast<T>(ag[r]));\n\
                       const float u = static_cast<float>(static_cast<T>(au[r]));\n\
                       {gate}\
                       y0[slot + r] = static_cast<T>(a * u);\n\
                     }}\n\
                 }}\n",
                rows_call(0, "slot, 1"),
                rows_call(1, "slot, 1"),
                n = c.slots[0],
            );
        }
    }
    s
}

/// An `mlx_fast_cuda_kernel`: the kernel's names and source, compiled by
/// MLX on first use.
#[derive(Debug)]
struct Handle(mlx_sys::mlx_fast_cuda_kernel);

// SAFETY: the handle holds MLX's kernel description (strings and a
// function object that builds the primitive); it is only read after
// construction, under the plan's own use from one thread at a time.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle was made by `mlx_fast_cuda_kernel_new` and is
        // freed once.
        unsafe { mlx_sys::mlx_fast_cuda_kernel_free(self.0) }
    }
}

fn strings(names: &[String]) -> Option<mlx_sys::mlx_vector_string> {
    // SAFETY: a new vector, filled with copies of NUL-terminated strings.
    unsafe {
        let v = mlx_sys::mlx_vector_string_new();
        for n in names {
            let c = CString::new(n.as_str()).ok()?;
            mlx_sys::mlx_vector_string_append_value(v, c.as_ptr());
        }
        Some(v)
    }
}

impl Handle {
    fn new(
        name: &str,
        inputs: &[String],
        outputs: &[String],
        source: &str,
        header: &str,
        shared: i32,
    ) -> Option<Handle> {
        let name = CString::new(name).ok()?;
        let source = CString::new(source).ok()?;
        let header = CString::new(header).ok()?;
        let ins = strings(inputs)?;
        let outs = strings(outputs)?;
        // SAFETY: every argument is live for the call; MLX copies the
        // strings; the vectors are freed after it.
        let h = unsafe {
            let h = mlx_sys::mlx_fast_cuda_kernel_new(
                name.as_ptr(),
                ins,
                outs,
                source.as_ptr(),
                header.as_ptr(),
                true,
                shared,
            );
            mlx_sys::mlx_vector_string_free(ins);
            mlx_sys::mlx_vector_string_free(outs);
            h
        };
        (!h.ctx.is_null()).then_some(Handle(h))
    }

    fn apply(
        &self,
        inputs: &[&Array],
        shapes: &[Vec<i32>],
        dtype: Dtype,
        threads: i32,
    ) -> Result<Vec<Array>, Exception> {
        // SAFETY: the config and vectors are made, filled, used and freed
        // here; the inputs are live arrays whose handles MLX copies; each
        // output taken from the result vector is a new reference we own.
        unsafe {
            let cfg = mlx_sys::mlx_fast_cuda_kernel_config_new();
            for s in shapes {
                mlx_sys::mlx_fast_cuda_kernel_config_add_output_arg(
                    cfg,
                    s.as_ptr(),
                    s.len(),
                    dtype as mlx_sys::mlx_dtype,
                );
            }
            mlx_sys::mlx_fast_cuda_kernel_config_set_grid(cfg, threads, 1, 1);
            mlx_sys::mlx_fast_cuda_kernel_config_set_thread_group(cfg, WARPS * 32, 1, 1);
            let ins = mlx_sys::mlx_vector_array_new();
            for a in inputs {
                mlx_sys::mlx_vector_array_append_value(ins, a.as_ptr());
            }
            let mut outs = mlx_sys::mlx_vector_array_new();
            let stream = mlx_sys::mlx_default_gpu_stream_new();
            let rc = mlx_sys::mlx_fast_cuda_kernel_apply(&mut outs, self.0, ins, cfg, stream);
            mlx_sys::mlx_stream_free(stream);
            mlx_sys::mlx_vector_array_free(ins);
            mlx_sys::mlx_fast_cuda_kernel_config_free(cfg);
            if rc != 0 {
                mlx_sys::mlx_vector_array_free(outs);
                return Err(Exception::custom("gpu kernel: MLX refused the kernel call"));
            }
            let n = mlx_sys::mlx_vector_array_size(outs);
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let mut a = mlx_sys::mlx_array_new();
                mlx_sys::mlx_vector_array_get(&mut a, outs, i);
                out.push(Array::from_ptr(a));
            }
            mlx_sys::mlx_vector_array_free(outs);
            Ok(out)
        }
    }
}

/// `max |got - want| / max |want|`, in float32.
fn relative_error(got: &Array, want: &Array) -> Result<f32, Exception> {
    let (g, w) = (
        got.as_dtype(Dtype::Float32)?,
        want.as_dtype(Dtype::Float32)?,
    );
    let diff = mlx_rs::ops::abs(mlx_rs::ops::subtract(&g, &w)?)?.max(None)?;
    let scale = mlx_rs::ops::abs(&w)?.max(None)?;
    mlx_rs::transforms::eval([&diff, &scale])?;
    Ok(diff.as_slice::<f32>()[0] / scale.as_slice::<f32>()[0].max(1e-30))
}

/// One [`check`] case: what ran and how far the kernel was from the ops.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub case: String,
    /// `max |kernel - ops| / max |ops|` over the outputs.
    pub max_rel: f32,
    /// The bound for the case's dtype (a few roundings of it).
    pub bound: f32,
}

/// Runs each kernel configuration on random inputs on the GPU and compares
/// it with the ops it replaces (MLX's `rms_norm`, `matmul` or
/// `quantized_matmul`, the gated unit, the add, and MLX's RoPE on the CPU).
/// Also says how far MLX's own RoPE on the GPU is from its CPU one, for
/// the same inputs. Errors when the default device is not a GPU.
pub fn check() -> Result<(Vec<CheckRow>, Vec<String>), Exception> {
    use mlx_rs::ops::{add, matmul, multiply, quantize, quantized_matmul, sigmoid};
    if crate::runtime::default_device() != "gpu" {
        return Err(Exception::custom(
            "gpu kernel check: the default device is not a GPU",
        ));
    }
    mlx_rs::random::seed(7)?;
    let normal = |shape: &[i32], dtype: Dtype| -> Result<Array, Exception> {
        mlx_rs::random::normal::<f32>(shape, None, None, None)?.as_dtype(dtype)
    };
    let mut rows = Vec::new();
    // RoPE cases: 0 none; 1 q and k rotated by a base, v split into heads;
    // 2 frequencies, interleaved pairs; 3 half the features, scaled positions.
    // Rows of 512 features, but for the last two: the gated unit and down
    // projection of an 8B-parameter decoder (4096 and 14336 features; a row
    // of 14336 floats is over 48 KB of shared memory).
    let cases: [(Dtype, Option<i32>, Epilogue, usize, u8); 16] = [
        (Dtype::Bfloat16, None, Epilogue::Split, 3, 0),
        (Dtype::Float16, None, Epilogue::Glu(GluAct::Silu), 2, 0),
        (Dtype::Float32, None, Epilogue::Residual, 1, 0),
        (Dtype::Bfloat16, None, Epilogue::Glu(GluAct::GeluTanh), 2, 0),
        (Dtype::Bfloat16, Some(4), Epilogue::Split, 3, 0),
        (Dtype::Bfloat16, Some(4), Epilogue::Glu(GluAct::Silu), 2, 0),
        (Dtype::Float16, Some(8), Epilogue::Residual, 1, 0),
        (Dtype::Float32, Some(2), Epilogue::Split, 2, 0),
        (Dtype::Bfloat16, Some(4), Epilogue::Residual, 1, 0),
        (Dtype::Bfloat16, None, Epilogue::Split, 3, 1),
        (Dtype::Bfloat16, Some(4), Epilogue::Split, 3, 2),
        (Dtype::Float32, None, Epilogue::Split, 3, 3),
        (Dtype::Float32, None, Epilogue::Split, 3, 1),
        (Dtype::Bfloat16, None, Epilogue::Split, 3, 3),
        (Dtype::Bfloat16, None, Epilogue::Glu(GluAct::Silu), 2, 0),
        (Dtype::Bfloat16, None, Epilogue::Residual, 1, 0),
    ];
    let position = 37;
    let mut mlx_rope = Vec::new();
    for (i, (dtype, bits, epilogue, n, roped)) in cases.into_iter().enumerate() {
        let wide = i + 2 >= cases.len();
        for norm in [true, false] {
            let (k, out): (i32, Vec<i32>) = match epilogue {
                Epilogue::Glu(_) if wide => (4096, vec![14336, 14336]),
                Epilogue::Glu(_) => (512, vec![384, 384]),
                _ if wide => (14336, vec![4096]),
                _ => (512, (0..n as i32).map(|i| 256 + 128 * (i % 2)).collect()),
            };
            let x = normal(&[1, 1, k], dtype)?;
            let nw = mlx_rs::ops::add(&normal(&[k], Dtype::Float32)?, Array::from_f32(1.0))?
                .as_dtype(dtype)?;
            let mut params = Vec::new();
            for &o in &out {
                let w = multiply(&normal(&[o, k], Dtype::Float32)?, Array::from_f32(0.05))?
                    .as_dtype(dtype)?;
                match bits {
                    None => params.push(Param::Dense(w)),
                    Some(b) => {
                        let (q, s, bi) = quantize(&w, 64, b)?;
                        params.push(Param::Quantized {
                            w: q,
                            scales: s,
                            biases: bi,
                            group_size: 64,
                            bits: b,
                        });
                    }
                }
            }
            let res = normal(&[1, 1, out[0]], dtype)?;
            let head_dim = 64;
            let freqs = mlx_rs::ops::add(
                &mlx_rs::ops::multiply(
                    &mlx_rs::random::uniform::<f32, f32>(0.0, 1.0, &[head_dim / 2], None)?,
                    Array::from_f32(5000.0),
                )?,
                Array::from_f32(1.0),
            )?;
            let rope = |i: usize| -> Option<RopeForm> {
                match (roped, i) {
                    (0, _) | (_, 2) => None,
                    (1, _) => Some(RopeForm {
                        dims: head_dim,
                        traditional: false,
                        log2_base: Some(10000f32.log2()),
                        scale: 1.0,
                        freqs: None,
                    }),
                    (2, _) => Some(RopeForm {
                        dims: head_dim,
                        traditional: true,
                        log2_base: None,
                        scale: 1.0,
                        freqs: Some(freqs.clone()),
                    }),
                    _ => Some(RopeForm {
                        dims: head_dim / 2,
                        traditional: false,
                        log2_base: Some(500000f32.log2()),
                        scale: 0.5,
                        freqs: None,
                    }),
                }
            };
            let forms: Vec<OutForm> = match roped {
                0 => Vec::new(),
                _ => out
                    .iter()
                    .enumerate()
                    .map(|(i, &o)| OutForm {
                        heads: Some((o / head_dim, head_dim)),
                        rope: rope(i),
                    })
                    .collect(),
            };
            let kernel =
                ProjKernel::new(norm.then(|| (nw.clone(), 1e-5)), &params, epilogue, &forms)
                    .ok_or_else(|| Exception::custom("gpu kernel check: a case was refused"))?;
            let did_not_apply = || Exception::custom("gpu kernel check: the kernel did not apply");
            let mut got = kernel
                .apply(&x, Some(&res), Some(position))?
                .ok_or_else(did_not_apply)?;
            // A residual projection also reads its row as heads (the
            // `merge_heads` before it), compared with the same ops.
            if epilogue == Epilogue::Residual && !norm {
                let heads = ProjKernel::new(None, &params, epilogue, &forms)
                    .ok_or_else(|| Exception::custom("gpu kernel check: a case was refused"))?
                    .reading_heads();
                let x4 = x.reshape(&[1, k / 64, 1, 64])?;
                got.extend(
                    heads
                        .apply(&x4, Some(&res), None)?
                        .ok_or_else(did_not_apply)?,
                );
            }
            // The ops the kernel stands for.
            let h = if norm {
                mlx_rs::fast::rms_norm(&x, Some(&nw), 1e-5)?
            } else {
                x.clone()
            };
            let mut ys = Vec::new();
            for p in &params {
                ys.push(match p {
                    Param::Dense(w) => matmul(&h, w.t())?,
                    Param::Quantized {
                        w,
                        scales,
                        biases,
                        group_size,
                        bits,
                    } => quantized_matmul(&h, w, scales, biases, true, *group_size, *bits)?,
                });
            }
            let want = match epilogue {
                Epilogue::Split if roped > 0 => {
                    let mut split = Vec::new();
                    for (i, y) in ys.iter().enumerate() {
                        let h = out[i] / head_dim;
                        let y = y.reshape(&[1, h, 1, head_dim])?;
                        split.push(match rope(i) {
                            None => y,
                            // MLX's RoPE on the CPU: its CUDA kernel is
                            // checked against it below.
                            Some(r) => {
                                let cpu = mlx_rs::Stream::cpu();
                                let f = |y: &Array| {
                                    mlx_rs::fast::rope(
                                        y,
                                        r.dims,
                                        r.traditional,
                                        r.log2_base.map(f32::exp2),
                                        r.scale,
                                        position,
                                        r.freqs.as_ref(),
                                    )
                                };
                                let on_gpu = f(&y)?;
                                let on_cpu = mlx_rs::with_stream(&cpu, || f(&y))?;
                                mlx_rope.push(format!(
                                    "{dtype:?} {} rope of output {i}: {:.2e}",
                                    ["", "base", "freqs, pairs", "partial"][roped as usize],
                                    relative_error(&on_gpu, &on_cpu)?
                                ));
                                on_cpu
                            }
                        });
                    }
                    split
                }
                Epilogue::Split => ys,
                Epilogue::Residual if norm => vec![add(&res, &ys[0])?],
                Epilogue::Residual => vec![add(&res, &ys[0])?; 2],
                Epilogue::Glu(GluAct::Silu) => {
                    vec![multiply(multiply(&ys[0], sigmoid(&ys[0])?)?, &ys[1])?]
                }
                Epilogue::Glu(GluAct::GeluTanh) => vec![multiply(
                    crate::ops::activate(lmspec_spec::ops::Act::GeluApprox, &ys[0])?,
                    &ys[1],
                )?],
            };
            let mut max_rel = 0f32;
            let mut each = Vec::new();
            for (g, w) in got.iter().zip(&want) {
                let rel = relative_error(g, w)?;
                each.push(format!("{rel:.1e}"));
                // A NaN fails the case (`f32::max` would drop it).
                max_rel = if rel.is_nan() || max_rel.is_nan() {
                    f32::NAN
                } else {
                    max_rel.max(rel)
                };
            }
            let bound = match dtype {
                Dtype::Float32 => 1e-5,
                Dtype::Float16 => 2e-3,
                _ => 1.6e-2,
            };
            rows.push(CheckRow {
                case: format!(
                    "{dtype:?} {} {epilogue:?} x{n}{}{}{}",
                    bits.map_or("dense".to_string(), |b| format!("q{b}/64")),
                    if wide {
                        format!(" {k}->{}", out[0])
                    } else {
                        String::new()
                    },
                    ["", " +rope", " +rope(freqs, pairs)", " +rope(partial)"][roped as usize],
                    if norm { " +rms_norm" } else { "" }
                ) + &if roped > 0 {
                    format!(" [{}]", each.join(", "))
                } else {
                    String::new()
                },
                max_rel,
                bound,
            });
        }
    }
    Ok((rows, mlx_rope))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_run_on_a_gpu_unless_off() {
        for setting in [None, Some("auto"), Some("on"), Some("groups")] {
            assert!(policy(setting, true));
            // Never on a CPU.
            assert!(!policy(setting, false));
        }
        assert!(!policy(Some("off"), true));
    }

    #[test]
    fn rows_per_warp_follows_the_outputs() {
        // A RoPE rotates pairs of rows: one pair per warp.
        assert_eq!(rows_per_warp(&[2048, 512, 512], true), 2);
        // A 1B model's q, k and v: one row per warp keeps the SMs busy.
        assert_eq!(rows_per_warp(&[2048, 512, 512], false), 1);
        // A vocabulary head: four rows per warp.
        assert_eq!(rows_per_warp(&[128256], false), 4);
        // Rows that 4 does not divide.
        assert_eq!(rows_per_warp(&[8194], false), 2);
    }

    #[test]
    fn the_body_rotates_pairs_of_rows() {
        let w = Param::Dense(Array::zeros::<f32>(&[128, 64]).expect("zeros"));
        let forms = [OutForm {
            heads: Some((2, 64)),
            rope: Some(RopeForm {
                dims: 32,
                traditional: false,
                log2_base: Some(13.0),
                scale: 1.0,
                freqs: None,
            }),
        }];
        let source = body(&Config {
            dtype: Dtype::Bfloat16,
            features: 64,
            norm_eps: Some(1e-5),
            weights: std::slice::from_ref(&w),
            slots: &[128],
            per_warp: rows_per_warp(&[128], true),
            epilogue: Epilogue::Split,
            forms: &forms,
        });
        for line in [
            "typedef __nv_bfloat16 T;",
            "constexpr int R = 2;",
            // Half-split pairs (j, j + 16) of each head's 32 rotated
            // features; the other 32 pass in pairs of neighbours.
            "if (rot) { row = h * 64 + j; step = 16; }",
            "else { row = h * 64 + 32 + 2 * (j - 16); }",
            "const float inv = rsqrtf(tot / K + 1e-5f);",
        ] {
            assert!(source.contains(line), "{line} missing from\n{source}");
        }
    }
}
