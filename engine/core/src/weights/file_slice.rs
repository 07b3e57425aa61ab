//! Slices of tensors read straight from their safetensors file: a rank of a
//! tensor-parallel run reads its rows or columns of a weight and not the
//! rest. The read is an MLX primitive of lmspec's (`LmspecFileSlice` in
//! `cpu/kernels.cpp`), lazy like MLX's own loads.
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::PathBuf;

use mlx_rs::Array;

extern "C" {
    fn lmspec_array_id(a: *const c_void) -> usize;
    fn lmspec_file_bytes_read() -> u64;
    #[allow(clippy::too_many_arguments)]
    fn lmspec_file_slice(
        out: *mut *mut c_void,
        path: *const c_char,
        base: u64,
        outer: i64,
        stride: i64,
        seg_offset: i64,
        seg_bytes: i64,
        shape: *const c_int,
        ndim: c_int,
        dtype: c_int,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// Where a loaded tensor's bytes are: its file, the offset of its data and
/// its layout.
#[derive(Debug, Clone)]
pub struct FileTensor {
    pub file: PathBuf,
    /// Offset of the first byte of the data in the file.
    pub offset: u64,
    pub shape: Vec<i64>,
    /// The dtype as the C side numbers it, and its size in bytes.
    code: c_int,
    item: i64,
}

/// The tensors of a checkpoint that were loaded straight from a file, by
/// the identity of their MLX array ([`array_id`]): an array a weight rule
/// made is not among them.
pub type FileTensors = HashMap<usize, FileTensor>;

impl FileTensor {
    /// A tensor of safetensors dtype `dtype`; `None` for a dtype the
    /// slice read does not take (its slices are cut from the whole tensor).
    pub fn new(file: PathBuf, offset: u64, shape: Vec<i64>, dtype: &str) -> Option<FileTensor> {
        let (code, item) = match dtype {
            "F32" => (0, 4),
            "F16" => (1, 2),
            "BF16" => (2, 2),
            "U32" => (3, 4),
            "U8" => (4, 1),
            "I8" => (5, 1),
            _ => return None,
        };
        Some(FileTensor {
            file,
            offset,
            shape,
            code,
            item,
        })
    }

    /// Values `start..start + len` along `axis`, read from the file when
    /// the array is evaluated.
    pub fn slice(&self, axis: usize, start: i64, len: i64) -> Result<Array, String> {
        let dim = *self
            .shape
            .get(axis)
            .ok_or_else(|| format!("no axis {axis} in {:?}", self.shape))?;
        if start < 0 || len < 0 || start + len > dim {
            return Err(format!(
                "{start}..{} is outside axis {axis} of {:?}",
                start + len,
                self.shape
            ));
        }
        let outer: i64 = self.shape[..axis].iter().product();
        let inner: i64 = self.shape[axis + 1..].iter().product::<i64>() * self.item;
        let mut shape: Vec<c_int> = self.shape.iter().map(|&d| d as c_int).collect();
        shape[axis] = len as c_int;
        let path = CString::new(self.file.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{}: the path holds a NUL byte", self.file.display()))?;
        let mut err = [0 as c_char; 512];
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: every pointer is live for the call; `out` receives a new
        // `mlx::core::array*` (owned by the returned Array) on success.
        let rc = unsafe {
            lmspec_file_slice(
                &mut out,
                path.as_ptr(),
                self.offset,
                outer,
                dim * inner,
                start * inner,
                len * inner,
                shape.as_ptr(),
                shape.len() as c_int,
                self.code,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc != 0 {
            // SAFETY: the C side wrote a NUL-terminated message into `err`.
            let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
            return Err(msg.to_string_lossy().into_owned());
        }
        // SAFETY: `out` is a fresh `mlx::core::array*`, i.e. the `ctx` of an
        // `mlx_array` handle, whose ownership passes to the Array.
        Ok(unsafe { Array::from_ptr(mlx_sys::mlx_array { ctx: out }) })
    }
}

/// The identity of an MLX array: the same for every handle of it, new for
/// any op's result.
pub fn array_id(a: &Array) -> usize {
    // SAFETY: `ctx` is a live `mlx::core::array*` for the call.
    unsafe { lmspec_array_id(a.as_ptr().ctx) }
}

/// Bytes read by slice reads in this process so far.
pub fn bytes_read() -> u64 {
    // SAFETY: reads an atomic counter.
    unsafe { lmspec_file_bytes_read() }
}
