//! GGUF, versions 2 and 3, little-endian: magic "GGUF", u32 version, u64
//! tensor count, u64 metadata count, the metadata key/value pairs, the
//! tensor infos, padding to the alignment, then the tensor data.

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

use crate::{FormatError, Limits};

/// A metadata value; GGUF value type ids 0..=12 in the order of the variants.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer value that fits a u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: u32,
    /// As ggml spells it: "F32", "Q4_K", ...
    pub type_name: &'static str,
    /// ggml order: `dims[0]` is the innermost (contiguous) axis.
    pub dims: Vec<u64>,
    /// Relative to [`Header::data_start`].
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub alignment: u64,
    /// In the order of the file.
    pub metadata: Vec<(String, Value)>,
    /// In the order of the file.
    pub tensors: Vec<TensorInfo>,
    /// Offset in the file where the tensor data starts.
    pub data_start: u64,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// ggml's name, block size (elements) and bytes per block for a type id.
pub fn ggml_type_info(ggml_type: u32) -> Option<(&'static str, u64, u64)> {
    Some(match ggml_type {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    })
}

const DEFAULT_ALIGNMENT: u64 = 32;
/// Fewest bytes a tensor info can take: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO: u64 = 8 + 4 + 8 + 4 + 8;
/// Fewest bytes a key/value pair can take: key length, type, a 1-byte value.
const MIN_KV: u64 = 8 + 4 + 1;

/// Reads and checks the header of a GGUF file from `r` (best buffered),
/// whose total length is `file_len`. Reads up to the end of the tensor
/// infos and nothing more.
pub fn check<R: Read>(r: R, file_len: u64, limits: &Limits) -> Result<Header, FormatError> {
    let mut c = Cursor {
        r,
        pos: 0,
        len: file_len,
        limits,
        node: "header".into(),
    };
    let magic: [u8; 4] = c.bytes("magic")?;
    if &magic != b"GGUF" {
        bail!(
            &c.node,
            "magic",
            "expected \"GGUF\", found {:?}",
            String::from_utf8_lossy(&magic)
        );
    }
    let version = c.u32("version")?;
    let swapped = version.swap_bytes();
    if matches!(swapped, 2 | 3) {
        bail!(
            &c.node,
            "version",
            "big-endian GGUF (version {swapped}) is not supported"
        );
    } else if !matches!(version, 2 | 3) {
        bail!(
            &c.node,
            "version",
            "unsupported GGUF version {version} (only 2 and 3)"
        );
    }
    let n_tensors = c.count("tensor_count", limits.max_tensors, MIN_TENSOR_INFO)?;
    let n_kv = c.count("metadata_kv_count", limits.max_metadata, MIN_KV)?;

    let mut metadata: Vec<(String, Value)> = Vec::new();
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        c.node = format!("metadata[{i}]");
        let key = c.string("key")?;
        c.node = format!("metadata['{}']", key.escape_debug());
        if !keys.insert(key.clone()) {
            bail!(&c.node, "key", "duplicate key");
        }
        let ty = c.u32("type")?;
        let value = c.value(ty, 0)?;
        metadata.push((key, value));
    }

    let node = "metadata['general.alignment']";
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, Value::U32(a))) => bail!(node, "value", "{a} is not a nonzero power of two"),
        Some((_, v)) => bail!(node, "type", "expected a u32, found {v:?}"),
    };

    let max_dims = limits.max_dims.min(4);
    let mut tensors: Vec<TensorInfo> = Vec::new();
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        c.node = format!("tensors[{i}]");
        let name = c.string("name")?;
        c.node = format!("tensors[{i}] '{}'", name.escape_debug());
        if !names.insert(name.clone()) {
            bail!(&c.node, "name", "duplicate tensor name");
        }
        let n_dims = c.u32("n_dims")?;
        if n_dims == 0 || n_dims as usize > max_dims {
            bail!(
                &c.node,
                "n_dims",
                "{n_dims} dimensions, expected 1..={max_dims}"
            );
        }
        let mut dims = Vec::new();
        for d in 0..n_dims {
            let field = format!("dims[{d}]");
            match c.u64(&field)? {
                0 => bail!(&c.node, field, "dimension is 0"),
                dim => dims.push(dim),
            }
        }
        let ggml_type = c.u32("type")?;
        let Some((type_name, block, block_bytes)) = ggml_type_info(ggml_type) else {
            bail!(&c.node, "type", "unknown ggml type {ggml_type}");
        };
        let d0 = dims[0];
        if d0 % block != 0 {
            bail!(
                &c.node,
                "dims[0]",
                "{d0} is not a multiple of the {type_name} block size {block}"
            );
        }
        let bytes = (dims.iter().skip(1)).try_fold(d0 / block, |acc, &d| acc.checked_mul(d));
        let Some(bytes) = bytes.and_then(|blocks| blocks.checked_mul(block_bytes)) else {
            bail!(
                &c.node,
                "dims",
                "{dims:?} of {type_name} overflows a 64-bit byte count"
            );
        };
        let offset = c.u64("offset")?;
        if offset % alignment != 0 {
            bail!(
                &c.node,
                "offset",
                "{offset} is not a multiple of the alignment {alignment}"
            );
        }
        tensors.push(TensorInfo {
            name,
            ggml_type,
            type_name,
            dims,
            offset,
            bytes,
        });
    }

    // Byte ranges relative to the data start; within the file, then disjoint.
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let node = |i: usize| format!("tensors[{i}] '{}'", tensors[i].name.escape_debug());
    for (i, t) in tensors.iter().enumerate() {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.bytes));
        if end.is_none_or(|end| end > file_len) {
            let (n, o) = (t.bytes, t.offset);
            let msg = format!("{n} bytes at {o} from the data start {data_start} run past the end");
            bail!(node(i), "offset", "{msg} of the {file_len}-byte file");
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
        let (a_end, b_end) = (a.offset + a.bytes, b.offset + b.bytes);
        if b.offset < a_end {
            let (an, ao, bo) = (&a.name, a.offset, b.offset);
            bail!(
                node(w[1]),
                "offset",
                "bytes {bo}..{b_end} overlap tensor '{an}' at bytes {ao}..{a_end}"
            );
        }
    }
    Ok(Header {
        version,
        alignment,
        metadata,
        tensors,
        data_start,
    })
}

/// [`check`] on a whole file in memory.
pub fn check_bytes(bytes: &[u8], limits: &Limits) -> Result<Header, FormatError> {
    check(bytes, bytes.len() as u64, limits)
}

/// [`check`] on a file through a `BufReader`; failures to open it name node `"file"`.
pub fn check_file(path: &Path, limits: &Limits) -> Result<Header, FormatError> {
    let (r, len) = crate::open(path)?;
    check(r, len, limits)
}

/// Reads little-endian values, never past `len` nor `limits.max_header_bytes`,
/// and knows which part of the file it is in for errors.
struct Cursor<'l, R> {
    r: R,
    pos: u64,
    len: u64,
    limits: &'l Limits,
    node: String,
}

impl<R: Read> Cursor<'_, R> {
    fn fail(&self, field: &str, msg: impl Into<String>) -> FormatError {
        FormatError::new(self.node.clone(), field, msg)
    }

    fn left(&self) -> u64 {
        self.len
            .saturating_sub(self.pos)
            .min(self.limits.max_header_bytes.saturating_sub(self.pos))
    }

    /// Fails unless `n` more bytes are there to read.
    fn need(&self, field: &str, n: u64) -> Result<(), FormatError> {
        let (pos, len, max) = (self.pos, self.len, self.limits.max_header_bytes);
        if n <= self.left() {
            Ok(())
        } else if pos.saturating_add(n) > len {
            bail!(
                &self.node,
                field,
                "needs {n} bytes at offset {pos} but the file is {len} bytes"
            )
        } else {
            bail!(
                &self.node,
                field,
                "the header would pass the limit of {max} bytes"
            )
        }
    }

    fn bytes<const N: usize>(&mut self, field: &str) -> Result<[u8; N], FormatError> {
        self.need(field, N as u64)?;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| FormatError::io(&self.node, field, &e))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, field: &str) -> Result<u32, FormatError> {
        self.bytes(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64, FormatError> {
        self.bytes(field).map(u64::from_le_bytes)
    }

    /// A count of items at least `min_size` bytes each, within `max` and the bytes left.
    fn count(&mut self, field: &str, max: u64, min_size: u64) -> Result<u64, FormatError> {
        let n = self.u64(field)?;
        if n > max {
            return Err(self.fail(field, format!("{n} is more than the limit of {max}")));
        }
        self.need(field, n.saturating_mul(min_size)).map_err(|e| {
            let msg = format!("{n} items of at least {min_size} bytes: {}", e.msg);
            FormatError { msg, ..e }
        })?;
        Ok(n)
    }

    fn string(&mut self, field: &str) -> Result<String, FormatError> {
        let n = self.u64(field)?;
        self.need(field, n)?;
        let mut buf = Vec::new();
        (&mut self.r)
            .take(n)
            .read_to_end(&mut buf)
            .map_err(|e| FormatError::io(&self.node, field, &e))?;
        if buf.len() as u64 != n {
            return Err(self.fail(
                field,
                format!("the file ends {} bytes into a {n}-byte string", buf.len()),
            ));
        }
        self.pos += n;
        String::from_utf8(buf).map_err(|e| self.fail(field, format!("not UTF-8: {e}")))
    }

    /// A value of GGUF type `ty`, inside `depth` arrays.
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, FormatError> {
        let f = "value";
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.bytes(f)?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes(f)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes(f)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(f)?)),
            4 => Value::U32(u32::from_le_bytes(self.bytes(f)?)),
            5 => Value::I32(i32::from_le_bytes(self.bytes(f)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(f)?)),
            7 => match self.bytes::<1>(f)? {
                [0] => Value::Bool(false),
                [1] => Value::Bool(true),
                [b] => return Err(self.fail(f, format!("bool byte is {b}, not 0 or 1"))),
            },
            8 => Value::String(self.string(f)?),
            9 => {
                if depth >= self.limits.max_nesting {
                    return Err(self.fail(
                        f,
                        format!("arrays nested deeper than {}", self.limits.max_nesting),
                    ));
                }
                let elem = self.u32("type")?;
                let min_size = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.fail("type", format!("unknown array element type {t}"))),
                };
                let n = self.count("length", u64::MAX, min_size)?;
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.bytes(f)?)),
            11 => Value::I64(i64::from_le_bytes(self.bytes(f)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(f)?)),
            t => return Err(self.fail("type", format!("unknown value type {t}"))),
        })
    }
}
