//! safetensors: an 8-byte little-endian header length N, N bytes of UTF-8
//! JSON, then the data. Each JSON entry but `__metadata__` is
//! `{"dtype", "shape", "data_offsets": [begin, end]}`, offsets relative to
//! the start of the data; `__metadata__` maps strings to strings.

use std::io::Read;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::{FormatError, Limits};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Byte range relative to the start of the data.
    pub begin: u64,
    pub end: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// N, the length of the JSON.
    pub header_len: u64,
    /// In the order of the file.
    pub tensors: Vec<TensorInfo>,
    pub metadata: Option<Map<String, Value>>,
}

impl Header {
    /// Offset in the file where the data starts.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Bytes per element; sub-byte types (F4, F6_*) are refused.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Reads and checks the header of a safetensors file from `r`, whose total
/// length is `file_len`. Reads the 8 + N header bytes and nothing more.
pub fn check<R: Read>(mut r: R, file_len: u64, limits: &Limits) -> Result<Header, FormatError> {
    const H: &str = "header";
    if file_len < 8 {
        bail!(
            H,
            "length",
            "{file_len} bytes, shorter than the 8-byte length"
        );
    }
    let mut prefix = [0u8; 8];
    r.read_exact(&mut prefix)
        .map_err(|e| FormatError::io(H, "length", &e))?;
    let (n, max) = (u64::from_le_bytes(prefix), limits.max_header_bytes);
    let after = file_len - 8;
    if n == 0 {
        bail!(H, "length", "the header length is 0");
    } else if n > max {
        bail!(
            H,
            "length",
            "header length {n} exceeds the limit of {max} bytes"
        );
    } else if n > after {
        bail!(
            H,
            "length",
            "header length {n} but only {after} bytes follow"
        );
    }
    let mut buf = Vec::new();
    let read = r.take(n).read_to_end(&mut buf);
    read.map_err(|e| FormatError::io(H, "json", &e))?;
    if buf.len() as u64 != n {
        bail!(
            H,
            "json",
            "the file ends after {} of the {n} header bytes",
            buf.len()
        );
    }
    let text = match std::str::from_utf8(&buf) {
        Ok(text) => text,
        Err(e) => bail!(H, "json", "not UTF-8: {e}"),
    };
    let json = match serde_json::from_str(text) {
        Ok(Strict(Value::Object(map))) => map,
        Ok(Strict(v)) => bail!(H, "json", "expected a JSON object, found {}", kind(&v)),
        Err(e) => bail!(H, "json", "{e}"),
    };
    let mut tensors: Vec<TensorInfo> = Vec::new();
    let mut metadata = None;
    for (name, value) in json {
        if name == "__metadata__" {
            // MLX writes `null` when there is no metadata.
            if !value.is_null() {
                metadata = Some(check_metadata(value)?);
            }
        } else if tensors.len() as u64 >= limits.max_tensors {
            bail!(H, "tensors", "more than {} tensors", limits.max_tensors);
        } else {
            tensors.push(check_tensor(name, value, after - n, limits)?);
        }
    }
    let mut ranges: Vec<&TensorInfo> = tensors.iter().filter(|t| t.begin < t.end).collect();
    ranges.sort_by_key(|t| (t.begin, t.end));
    for w in ranges.windows(2) {
        let (a, b) = (w[0], w[1]);
        if b.begin < a.end {
            let (b0, b1, a0, a1) = (b.begin, b.end, a.begin, a.end);
            let msg = format!(
                "bytes {b0}..{b1} overlap tensor '{}' at bytes {a0}..{a1}",
                a.name
            );
            bail!(
                format!("tensor '{}'", b.name.escape_debug()),
                "data_offsets",
                "{msg}"
            );
        }
    }
    Ok(Header {
        header_len: n,
        tensors,
        metadata,
    })
}

/// [`check`] on a whole file in memory.
pub fn check_bytes(bytes: &[u8], limits: &Limits) -> Result<Header, FormatError> {
    check(bytes, bytes.len() as u64, limits)
}

/// [`check`] on a file; failures to open it name node `"file"`.
pub fn check_file(path: &Path, limits: &Limits) -> Result<Header, FormatError> {
    let (r, len) = crate::open(path)?;
    check(r, len, limits)
}

fn check_metadata(value: Value) -> Result<Map<String, Value>, FormatError> {
    const M: &str = "__metadata__";
    let Value::Object(map) = value else {
        bail!(M, "value", "expected an object, found {}", kind(&value));
    };
    if let Some((k, v)) = map.iter().find(|(_, v)| !v.is_string()) {
        bail!(
            M,
            format!("['{k}']"),
            "expected a string, found {}",
            kind(v)
        );
    }
    Ok(map)
}

fn check_tensor(
    name: String,
    v: Value,
    data: u64,
    limits: &Limits,
) -> Result<TensorInfo, FormatError> {
    let node = format!("tensor '{}'", name.escape_debug());
    let Value::Object(m) = v else {
        bail!(node, "entry", "expected an object, found {}", kind(&v));
    };
    let known = |k: &&String| matches!(k.as_str(), "dtype" | "shape" | "data_offsets");
    if let Some(k) = m.keys().find(|k| !known(k)) {
        bail!(node, k, "unknown field");
    }
    let dtype = match m.get("dtype") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => bail!(node, "dtype", "expected a string, found {}", kind(v)),
        None => bail!(node, "dtype", "missing"),
    };
    let Some(size) = dtype_size(&dtype) else {
        bail!(node, "dtype", "unknown or unsupported dtype '{dtype}'");
    };
    let (shape, offsets) = match (uints(m.get("shape")), uints(m.get("data_offsets"))) {
        (Err(msg), _) => bail!(node, "shape", "{msg}"),
        (_, Err(msg)) => bail!(node, "data_offsets", "{msg}"),
        (Ok(shape), Ok(offsets)) => (shape, offsets),
    };
    if shape.len() > limits.max_dims {
        bail!(
            node,
            "shape",
            "{} axes, more than {}",
            shape.len(),
            limits.max_dims
        );
    }
    let &[begin, end] = offsets.as_slice() else {
        bail!(
            node,
            "data_offsets",
            "expected [begin, end], found {} numbers",
            offsets.len()
        );
    };
    let Some(need) = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d)) else {
        bail!(
            node,
            "shape",
            "{shape:?} of {dtype} overflows a 64-bit byte count"
        );
    };
    let field = "data_offsets";
    if begin > end {
        bail!(node, field, "begin {begin} is after end {end}");
    } else if end > data {
        bail!(
            node,
            field,
            "bytes {begin}..{end} but the data is only {data} bytes"
        );
    } else if end - begin != need {
        let len = end - begin;
        bail!(
            node,
            field,
            "bytes {begin}..{end} ({len} bytes) but shape {shape:?} of {dtype} needs {need}"
        );
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

fn uints(value: Option<&Value>) -> Result<Vec<u64>, String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .ok_or_else(|| format!("entry {i} is {v}, not a non-negative integer"))
            })
            .collect(),
        Some(v) => Err(format!("expected an array, found {}", kind(v))),
        None => Err("missing".into()),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON value whose objects, at any depth, have no repeated key
/// (serde_json alone keeps the last one silently).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(A::Error::custom(format!("duplicate key '{key}'")));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}
