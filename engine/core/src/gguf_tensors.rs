//! GGUF tensor data read by our own reader (`lmspec_formats::gguf_data`)
//! into MLX arrays: floats as stored, quantized types as affine
//! quantization, packed `weight` + `scales` + `biases` (groups of 32, or
//! 16 for Q2_K, Q3_K and Q6_K), named as MLX's own GGUF reader names them
//! (`x.weight` -> `x.weight`, `x.scales`, `x.biases`).
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use indexmap::IndexMap;
use lmspec_formats::gguf::{Header, TensorInfo};
use lmspec_formats::gguf_data::{Decoded, Decoder, Floats};
use mlx_rs::Array;

use crate::error::{Error, Result};

fn bad(file: &Path, msg: impl Into<String>) -> Error {
    Error::Weights {
        file: file.to_path_buf(),
        msg: msg.into(),
    }
}

/// Bytes read at a time (whole rows, at least one).
const CHUNK: usize = 4 << 20;

/// The tensors of a checked GGUF file, by name (the order of the file).
pub fn read_tensors(file: &Path, header: &Header) -> Result<IndexMap<String, Array>> {
    let mut f = File::open(file).map_err(|e| Error::io(file, e))?;
    let mut out = IndexMap::new();
    for t in &header.tensors {
        for (name, a) in read_into_mlx(&mut f, file, header, t)? {
            if out.insert(name.clone(), a).is_some() {
                return Err(bad(
                    file,
                    format!(
                        "tensor '{}': its quantization arrays' name '{name}' is taken",
                        t.name
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Reads one tensor a few rows at a time, decoding each chunk straight into
/// the arrays MLX will hold: no whole-tensor copy exists besides MLX's own.
fn read_into_mlx(
    f: &mut File,
    file: &Path,
    header: &Header,
    t: &TensorInfo,
) -> Result<Vec<(String, Array)>> {
    let fail = |e: lmspec_formats::FormatError| bad(file, e.to_string());
    Decoder::new(t).map_err(fail)?;
    let start = header
        .data_start
        .checked_add(t.offset)
        .ok_or_else(|| bad(file, format!("tensor '{}': offset overflows", t.name)))?;
    f.seek(SeekFrom::Start(start))
        .map_err(|e| Error::io(file, e))?;
    let rows: u64 = t.dims.iter().skip(1).product();
    let row_bytes = t.bytes / rows.max(1);
    let per_chunk = (CHUNK as u64 / row_bytes.max(1)).clamp(1, rows.max(1));
    let shape = mlx_shape(file, t)?;
    let mut sink: Option<Sink> = None;
    let mut buf = Vec::new();
    let mut done = 0u64;
    while done < rows {
        let k = per_chunk.min(rows - done);
        let part = TensorInfo {
            dims: vec![t.dims[0], k],
            bytes: k * row_bytes,
            ..t.clone()
        };
        let n = usize::try_from(part.bytes).map_err(|_| bad(file, "tensor too large"))?;
        buf.resize(n, 0);
        f.read_exact(&mut buf).map_err(|e| {
            bad(
                file,
                format!(
                    "tensor '{}' ({}): data: cannot read {n} bytes: {e}",
                    t.name, t.type_name
                ),
            )
        })?;
        let decoded = lmspec_formats::gguf_data::decode(&part, &buf).map_err(fail)?;
        let s = match sink.as_mut() {
            Some(s) => s,
            None => sink.insert(Sink::new(&decoded, &shape).map_err(|e| bad(file, e))?),
        };
        s.write(decoded)
            .map_err(|e| bad(file, format!("tensor '{}': {e}", t.name)))?;
        done += k;
    }
    let sink = sink.ok_or_else(|| bad(file, format!("tensor '{}': no data", t.name)))?;
    Ok(sink.finish(&t.name))
}

/// An evaluated, row-contiguous array of zeros of `shape` for us to fill.
fn blank<T: mlx_rs::ArrayElement>(shape: &[i32]) -> std::result::Result<Array, String> {
    // Made on the CPU: eval returns with the buffer written, nothing in
    // flight on another device.
    let cpu = mlx_rs::Stream::cpu();
    let a = mlx_rs::with_stream(&cpu, || Array::zeros::<T>(shape)).map_err(|e| e.to_string())?;
    a.eval().map_err(|e| e.to_string())?;
    if !crate::cpu_kernels::row_contiguous(&a) {
        return Err("MLX gave no contiguous buffer to fill".into());
    }
    Ok(a)
}

/// Copies `src` into `dst`'s buffer from element `at` on.
fn fill<T: mlx_rs::ArrayElement>(
    dst: &Array,
    at: &mut usize,
    src: &[T],
) -> std::result::Result<(), String> {
    let end = at.checked_add(src.len()).filter(|&e| e <= dst.size());
    if end.is_none() || dst.dtype() != T::DTYPE {
        return Err(format!(
            "{} {:?} values do not fit at {at} of {} {:?}",
            src.len(),
            T::DTYPE,
            dst.size(),
            dst.dtype()
        ));
    }
    // SAFETY: `dst` comes from `blank`: evaluated, row-contiguous, of
    // dtype T (checked above), its buffer held by this one handle and not
    // yet seen by any other array; the range `at..at + src.len()` lies
    // within its `size()` elements (checked above).
    unsafe {
        let base = mlx_sys::mlx_array_data_uint8(dst.as_ptr()) as *mut u8;
        if base.is_null() {
            return Err("MLX gave no buffer".into());
        }
        let at_bytes = *at * std::mem::size_of::<T>();
        std::ptr::copy_nonoverlapping(
            src.as_ptr() as *const u8,
            base.add(at_bytes),
            std::mem::size_of_val(src),
        );
    }
    *at += src.len();
    Ok(())
}

/// Where one tensor's chunks go.
enum Sink {
    Dense(Array, usize),
    Affine {
        packed: (Array, usize),
        scales: (Array, usize),
        biases: (Array, usize),
    },
}

fn blank_floats(like: &Floats, shape: &[i32]) -> std::result::Result<Array, String> {
    match like {
        Floats::F16(_) => blank::<half::f16>(shape),
        Floats::F32(_) => blank::<f32>(shape),
    }
}

/// Writes `src` into `dst`, promoting `dst` to float32 when `src` is.
fn fill_floats(dst: &mut (Array, usize), src: Floats) -> std::result::Result<(), String> {
    match src {
        Floats::F32(v) if dst.0.dtype() == mlx_rs::Dtype::Float16 => {
            // Earlier chunks were exact in float16, this one is not.
            let wide = blank::<f32>(dst.0.shape())?;
            let old = dst
                .0
                .as_dtype(mlx_rs::Dtype::Float32)
                .map_err(|e| e.to_string())?;
            old.eval().map_err(|e| e.to_string())?;
            let mut at = 0;
            fill(&wide, &mut at, old.as_slice::<f32>())?;
            dst.0 = wide;
            fill(&dst.0, &mut dst.1, &v)
        }
        Floats::F16(v) if dst.0.dtype() == mlx_rs::Dtype::Float32 => {
            let v: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
            fill(&dst.0, &mut dst.1, &v)
        }
        Floats::F16(v) => fill(&dst.0, &mut dst.1, &v),
        Floats::F32(v) => fill(&dst.0, &mut dst.1, &v),
    }
}

impl Sink {
    fn new(first: &Decoded, shape: &[i32]) -> std::result::Result<Sink, String> {
        Ok(match first {
            Decoded::F32(_) => Sink::Dense(blank::<f32>(shape)?, 0),
            Decoded::F16(_) => Sink::Dense(blank::<half::f16>(shape)?, 0),
            Decoded::Bf16(_) => Sink::Dense(blank::<half::bf16>(shape)?, 0),
            Decoded::Affine {
                bits,
                group,
                scales,
                biases,
                ..
            } => {
                let (w_shape, s_shape) = affine_shapes(shape, *bits, *group);
                Sink::Affine {
                    packed: (blank::<u32>(&w_shape)?, 0),
                    scales: (blank_floats(scales, &s_shape)?, 0),
                    biases: (blank_floats(biases, &s_shape)?, 0),
                }
            }
        })
    }

    fn write(&mut self, d: Decoded) -> std::result::Result<(), String> {
        match (self, d) {
            (Sink::Dense(a, at), Decoded::F32(v)) => fill(a, at, &v),
            (Sink::Dense(a, at), Decoded::F16(v)) => fill(a, at, &v),
            (Sink::Dense(a, at), Decoded::Bf16(v)) => fill(a, at, &v),
            (
                Sink::Affine {
                    packed: (p, at),
                    scales: s,
                    biases: b,
                },
                Decoded::Affine {
                    packed,
                    scales,
                    biases,
                    ..
                },
            ) => {
                fill(p, at, &packed)?;
                fill_floats(s, scales)?;
                fill_floats(b, biases)
            }
            _ => Err("chunks decoded to different kinds".into()),
        }
    }

    fn finish(self, name: &str) -> Vec<(String, Array)> {
        match self {
            Sink::Dense(a, _) => vec![(name.to_string(), a)],
            Sink::Affine {
                packed,
                scales,
                biases,
            } => {
                let prefix = name.strip_suffix(".weight").unwrap_or(name);
                vec![
                    (name.to_string(), packed.0),
                    (format!("{prefix}.scales"), scales.0),
                    (format!("{prefix}.biases"), biases.0),
                ]
            }
        }
    }
}

/// Packed weight and scales shapes of an affine tensor of `shape`.
fn affine_shapes(shape: &[i32], bits: u32, group: usize) -> (Vec<i32>, Vec<i32>) {
    let last = *shape.last().unwrap_or(&0);
    let with_last = |n: i32| {
        let mut s = shape.to_vec();
        if let Some(x) = s.last_mut() {
            *x = n;
        }
        s
    };
    (
        with_last(last / 32 * bits as i32),
        with_last(last / group as i32),
    )
}

/// MLX's shape of `t` (ggml lists the innermost axis first).
fn mlx_shape(file: &Path, t: &TensorInfo) -> Result<Vec<i32>> {
    t.dims
        .iter()
        .rev()
        .map(|&d| {
            i32::try_from(d).map_err(|_| {
                bad(
                    file,
                    format!("tensor '{}': dims: {d} is more than MLX takes", t.name),
                )
            })
        })
        .collect()
}

fn floats(a: &Floats, shape: &[i32]) -> Array {
    match a {
        Floats::F16(v) => Array::from_slice(v, shape),
        Floats::F32(v) => Array::from_slice(v, shape),
    }
}

/// The arrays one tensor becomes, with their names.
pub fn to_arrays(file: &Path, t: &TensorInfo, d: Decoded) -> Result<Vec<(String, Array)>> {
    let shape = mlx_shape(file, t)?;
    Ok(match d {
        Decoded::F32(v) => vec![(t.name.clone(), Array::from_slice(&v, &shape))],
        Decoded::F16(v) => vec![(t.name.clone(), Array::from_slice(&v, &shape))],
        Decoded::Bf16(v) => vec![(t.name.clone(), Array::from_slice(&v, &shape))],
        Decoded::Affine {
            bits,
            group,
            packed,
            scales,
            biases,
        } => {
            let (w_shape, s_shape) = affine_shapes(&shape, bits, group);
            let prefix = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            vec![
                (t.name.clone(), Array::from_slice(&packed, &w_shape)),
                (format!("{prefix}.scales"), floats(&scales, &s_shape)),
                (format!("{prefix}.biases"), floats(&biases, &s_shape)),
            ]
        }
    })
}

/// Bytes held by `arrays`.
pub fn nbytes(arrays: &IndexMap<String, Array>) -> usize {
    arrays.values().map(|a| a.nbytes()).sum()
}
