use std::fmt::Debug;
use std::time::Instant;

use crate::gguf::{self, Value};
use crate::{safetensors, FormatError, Limits};

// ---- GGUF writer: each helper returns the encoded bytes ----

fn le(v: impl Into<u64>, width: usize) -> Vec<u8> {
    v.into().to_le_bytes()[..width].to_vec()
}

fn s(x: &str) -> Vec<u8> {
    [le(x.len() as u64, 8), x.as_bytes().to_vec()].concat()
}

fn arr(elem: u32, items: &[Vec<u8>]) -> Vec<u8> {
    [le(elem, 4), le(items.len() as u64, 8), items.concat()].concat()
}

fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    [s(key), le(ty, 4), value.to_vec()].concat()
}

fn ti(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let dims: Vec<u8> = dims.iter().flat_map(|d| d.to_le_bytes()).collect();
    let n_dims = le(dims.len() as u64 / 8, 4);
    [s(name), n_dims, dims, le(ty, 4), le(offset, 8)].concat()
}

fn raw(version: u32, n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
    [
        &b"GGUF"[..],
        &le(version, 4),
        &le(n_tensors, 8),
        &le(n_kv, 8),
        body,
    ]
    .concat()
}

/// A version 3 file of these pairs and infos, padded to 32, then `data` bytes.
fn file(kvs: &[Vec<u8>], tis: &[Vec<u8>], data: usize) -> Vec<u8> {
    let body = [kvs.concat(), tis.concat()].concat();
    let mut b = raw(3, tis.len() as u64, kvs.len() as u64, &body);
    b.resize(b.len().div_ceil(32) * 32 + data, 0);
    b
}

fn valid_kvs() -> Vec<Vec<u8>> {
    let nested = arr(9, &[arr(0, &[vec![1], vec![2]]), arr(0, &[vec![3]])]);
    vec![
        kv("general.architecture", 8, &s("arch")),
        kv("general.alignment", 4, &le(32u32, 4)),
        kv("tokenizer.ggml.tokens", 9, &arr(8, &[s("a"), s("bc")])),
        kv("flag", 7, &[1]),
        kv("nested", 9, &nested),
        kv("eps", 6, &1e-5f32.to_le_bytes()),
    ]
}

/// 32 bytes of F32 at 0, 36 of Q4_0 at 32, 6 of F16 at 96: 102 data bytes.
fn valid_tis() -> Vec<Vec<u8>> {
    vec![
        ti("tok.weight", &[4, 2], 0, 0),
        ti("blk.0.q", &[32, 2], 2, 32),
        ti("x", &[3], 1, 96),
    ]
}

fn valid_gguf() -> Vec<u8> {
    file(&valid_kvs(), &valid_tis(), 102)
}

/// The valid file with its last tensor info replaced.
fn with_tensor(t: Vec<u8>) -> Vec<u8> {
    let mut tis = valid_tis();
    tis[2] = t;
    file(&valid_kvs(), &tis, 102)
}

fn with_kv(extra: Vec<u8>) -> Vec<u8> {
    file(&[valid_kvs(), vec![extra]].concat(), &valid_tis(), 102)
}

fn with_alignment(ty: u32, value: Vec<u8>) -> Vec<u8> {
    let mut kvs = valid_kvs();
    kvs[1] = kv("general.alignment", ty, &value);
    file(&kvs, &valid_tis(), 102)
}

// ---- safetensors writer ----

fn st(json: &str, data: usize) -> Vec<u8> {
    [
        le(json.len() as u64, 8),
        json.as_bytes().to_vec(),
        vec![0; data],
    ]
    .concat()
}

const ST: &str = r#"{"__metadata__":{"format":"pt"},
  "a":{"dtype":"F16","shape":[10,20],"data_offsets":[0,400]},
  "b":{"dtype":"I64","shape":[],"data_offsets":[400,408]},
  "e":{"dtype":"F32","shape":[0],"data_offsets":[408,408]}}"#;

/// A file of one tensor 'w' and `data` bytes of data.
fn st1(dtype: &str, shape: &str, offsets: &str, data: usize) -> Vec<u8> {
    let entry = format!(r#""dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}"#);
    st(&format!(r#"{{"w":{{{entry}}}}}"#), data)
}

/// Tensors 'first' and 'second' of F32 at these offsets, 8 data bytes.
fn st2(first: &str, second: &str) -> Vec<u8> {
    let t = |off: &str| format!(r#"{{"dtype":"F32","shape":[1],"data_offsets":{off}}}"#);
    st(
        &format!(r#"{{"first":{},"second":{}}}"#, t(first), t(second)),
        8,
    )
}

// ---- assertions ----

/// (file, node, field, message): `check` must refuse the file with an error
/// whose node contains `node`, whose field is `field`, whose message
/// contains `message`.
type Case = (Vec<u8>, &'static str, &'static str, &'static str);

#[track_caller]
fn refused<T: Debug>(check: impl Fn(&[u8]) -> Result<T, FormatError>, cases: Vec<Case>) {
    for (i, (bytes, node, field, msg)) in cases.into_iter().enumerate() {
        match check(&bytes) {
            Ok(h) => panic!("case {i} ({msg}) accepted: {h:?}"),
            Err(e) => assert!(
                e.node.contains(node) && e.field == field && e.msg.contains(msg),
                "case {i}: expected {node} / {field} / ...{msg}..., got {e}"
            ),
        }
    }
}

fn gguf_check(b: &[u8]) -> Result<gguf::Header, FormatError> {
    gguf::check_bytes(b, &Limits::default())
}

fn st_check(b: &[u8]) -> Result<safetensors::Header, FormatError> {
    safetensors::check_bytes(b, &Limits::default())
}

// ---- GGUF ----

#[test]
fn gguf_valid() {
    let bytes = valid_gguf();
    let h = gguf_check(&bytes).unwrap();
    assert_eq!((h.version, h.alignment, h.metadata.len()), (3, 32, 6));
    assert_eq!(
        h.get("general.architecture").and_then(Value::as_str),
        Some("arch")
    );
    assert_eq!(h.get("general.alignment").and_then(Value::as_u64), Some(32));
    assert_eq!(h.get("flag"), Some(&Value::Bool(true)));
    let nested = Value::Array(vec![
        Value::Array(vec![Value::U8(1), Value::U8(2)]),
        Value::Array(vec![Value::U8(3)]),
    ]);
    assert_eq!(h.get("nested"), Some(&nested));
    assert_eq!(
        (h.data_start % 32, h.data_start + 102),
        (0, bytes.len() as u64)
    );
    let q = h.tensor("blk.0.q").unwrap();
    assert_eq!(
        (q.type_name, q.ggml_type, &q.dims[..]),
        ("Q4_0", 2, &[32, 2][..])
    );
    assert_eq!((q.offset, q.bytes), (32, 36));
    assert_eq!(
        h.tensors.iter().map(|t| t.bytes).collect::<Vec<_>>(),
        [32, 36, 6]
    );
    // Through a reader and through a file: the same header.
    let len = bytes.len() as u64;
    let via_reader = gguf::check(std::io::Cursor::new(&bytes), len, &Limits::default());
    assert_eq!(via_reader.as_ref(), Ok(&h));
    let mut f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f, &bytes).unwrap();
    assert_eq!(gguf::check_file(f.path(), &Limits::default()), Ok(h));
    let missing = gguf::check_file("/nonexistent/x.gguf".as_ref(), &Limits::default());
    assert_eq!(missing.map_err(|e| e.node), Err("file".to_string()));
    assert!(gguf_check(&raw(2, 0, 0, &[])).is_ok());
}

#[test]
fn gguf_truncated_at_every_offset() {
    let bytes = valid_gguf();
    let infos_end = raw(
        3,
        3,
        6,
        &[valid_kvs().concat(), valid_tis().concat()].concat(),
    )
    .len();
    for n in 0..bytes.len() {
        assert!(gguf_check(&bytes[..n]).is_err(), "accepted at {n}");
        // A reader that ends before the length it was promised.
        let r = gguf::check(&bytes[..n], bytes.len() as u64, &Limits::default());
        assert_eq!(r.is_ok(), n >= infos_end, "at {n}: {r:?}");
    }
    let cut = |n: usize| bytes[..n].to_vec();
    refused(
        gguf_check,
        vec![
            (
                cut(10),
                "header",
                "tensor_count",
                "needs 8 bytes at offset 8",
            ),
            (
                cut(bytes.len() - 1),
                "tensors[2] 'x'",
                "offset",
                "run past the end",
            ),
        ],
    );
}

#[rustfmt::skip]
#[test]
fn gguf_refused() {
    // 10_000 arrays of one array each, declared; refused at the ninth.
    let one_level = [le(9u32, 4), le(1u64, 8)].concat();
    let deep = [one_level.repeat(10_000), le(0u32, 4), le(1u64, 8), vec![7]].concat();
    let huge_key = [le(1u64 << 60, 8), vec![b'a'; 32]].concat();
    let mut bad_magic = valid_gguf();
    bad_magic[0] = b'X';
    let start = Instant::now();
    refused(gguf_check, vec![
        // header
        (bad_magic, "header", "magic", "found \"XGUF\""),
        (raw(1, 0, 0, &[]), "header", "version", "version 1 "),
        (raw(99, 0, 0, &[]), "header", "version", "version 99"),
        (raw(3u32.swap_bytes(), 0, 0, &[]), "header", "version", "big-endian"),
        (raw(3, 1 << 60, 0, &[]), "header", "tensor_count", "more than the limit"),
        (raw(3, 0, 1 << 60, &[]), "header", "metadata_kv_count", "more than the limit"),
        (raw(3, 999_999, 0, &[0; 64]), "header", "tensor_count",
            "999999 items of at least 32 bytes: needs 31999968 bytes at offset 16 but the file is 88 bytes"),
        // metadata
        (raw(3, 0, 1, &huge_key), "metadata[0]", "key", "needs 1152921504606846976 bytes"),
        (raw(3, 0, 1, &kv("s", 8, &le(1u64 << 40, 8))), "metadata['s']", "value", "needs"),
        (raw(3, 0, 1, &kv("t", 9, &[le(8u32, 4), le(1u64 << 60, 8)].concat())),
            "metadata['t']", "length", "1152921504606846976 items of at least 8 bytes"),
        (with_kv(kv("deep", 9, &deep)), "metadata['deep']", "value", "nested deeper than 8"),
        (with_kv(kv("flag", 7, &[1])), "metadata['flag']", "key", "duplicate"),
        (with_kv(kv("b", 7, &[2])), "metadata['b']", "value", "bool byte is 2"),
        (with_kv(kv("u", 13, &[0; 8])), "metadata['u']", "type", "unknown value type 13"),
        (with_kv(kv("a", 9, &arr(42, &[]))), "metadata['a']", "type", "unknown array element type 42"),
        (with_kv([le(2u64, 8), vec![0xff, 0xfe], le(7u32, 4), vec![0]].concat()),
            "metadata[6]", "key", "not UTF-8"),
        (with_alignment(4, le(0u32, 4)), "general.alignment", "value", "0 is not a nonzero power of two"),
        (with_alignment(4, le(3u32, 4)), "general.alignment", "value", "3 is not a nonzero power of two"),
        (with_alignment(10, le(32u64, 8)), "general.alignment", "type", "expected a u32, found U64(32)"),
        // tensor infos
        (with_tensor(ti("x", &[3, 0], 1, 96)), "tensors[2] 'x'", "dims[1]", "dimension is 0"),
        (with_tensor(ti("x", &[1; 5], 1, 96)), "tensors[2] 'x'", "n_dims", "5 dimensions, expected 1..=4"),
        (with_tensor(ti("x", &[], 1, 96)), "tensors[2] 'x'", "n_dims", "0 dimensions"),
        (with_tensor(ti("x", &[3], 99, 96)), "tensors[2] 'x'", "type", "unknown ggml type 99"),
        (with_tensor(ti("x", &[16], 2, 96)), "tensors[2] 'x'", "dims[0]", "Q4_0 block size 32"),
        (with_tensor(ti("x", &[1 << 32, 1 << 32, 16], 0, 96)), "'x'", "dims", "overflows"),
        (with_tensor(ti("x", &[3], 1, 100)), "tensors[2] 'x'", "offset", "not a multiple of the alignment"),
        (with_tensor(ti("x", &[3], 1, 1024)), "tensors[2] 'x'", "offset", "run past the end"),
        (with_tensor(ti("x", &[3], 1, u64::MAX - 31)), "tensors[2] 'x'", "offset", "run past the end"),
        (with_tensor(ti("x", &[3], 1, 32)), "tensors[2] 'x'", "offset",
            "bytes 32..38 overlap tensor 'blk.0.q' at bytes 32..68"),
        (with_tensor(ti("tok.weight", &[3], 1, 96)), "tensors[2] 'tok.weight'", "name", "duplicate"),
        (with_tensor([le(5u64, 8), vec![0xff; 5]].concat()), "tensors[2]", "name", "not UTF-8"),
    ]);
    assert!(start.elapsed().as_secs() < 2, "slow refusals: {:?}", start.elapsed());
}

#[test]
fn gguf_limits() {
    let refusal = |set: fn(&mut Limits)| {
        let mut limits = Limits::default();
        set(&mut limits);
        let e = gguf::check_bytes(&valid_gguf(), &limits).unwrap_err();
        e.to_string()
    };
    let header = refusal(|l| l.max_header_bytes = 40);
    assert!(header.starts_with("header: tensor_count: 3 items of at least 32 bytes"));
    assert!(header.ends_with("the header would pass the limit of 40 bytes"));
    let nesting = refusal(|l| l.max_nesting = 1);
    assert_eq!(
        nesting,
        "metadata['nested']: value: arrays nested deeper than 1"
    );
    let dims = refusal(|l| l.max_dims = 1);
    let msg = "n_dims: 2 dimensions, expected 1..=1";
    assert_eq!(dims, format!("tensors[0] 'tok.weight': {msg}"));
    let tensors = refusal(|l| l.max_tensors = 2);
    assert_eq!(
        tensors,
        "header: tensor_count: 3 is more than the limit of 2"
    );
    let metadata = refusal(|l| l.max_metadata = 5);
    assert_eq!(
        metadata,
        "header: metadata_kv_count: 6 is more than the limit of 5"
    );
}

// ---- safetensors ----

#[test]
fn safetensors_valid() {
    let bytes = st(ST, 408);
    let h = st_check(&bytes).unwrap();
    assert_eq!(
        (h.header_len, h.data_start()),
        (ST.len() as u64, 8 + ST.len() as u64)
    );
    let names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "e"]);
    let a = h.get("a").unwrap();
    assert_eq!((a.dtype.as_str(), &a.shape[..]), ("F16", &[10, 20][..]));
    assert_eq!((a.begin, a.end), (0, 400));
    assert_eq!(h.get("b").map(|t| t.shape.len()), Some(0));
    let format = h.metadata.as_ref().and_then(|m| m.get("format"));
    assert_eq!(format, Some(&serde_json::json!("pt")));
    // The reader is read up to the end of the header only.
    let len = bytes.len() as u64;
    let header_only = &bytes[..8 + ST.len()];
    assert_eq!(
        safetensors::check(header_only, len, &Limits::default()),
        Ok(h)
    );
    assert!(
        st_check(&st(&format!("{ST}    "), 408)).is_ok(),
        "space padding"
    );
    // MLX writes a null `__metadata__` when there is none.
    let null_meta = st(
        r#"{"__metadata__":null,"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
        2,
    );
    assert_eq!(st_check(&null_meta).map(|h| h.metadata), Ok(None));
}

#[test]
fn safetensors_truncated_at_every_offset() {
    let bytes = st(ST, 408);
    for n in 0..bytes.len() {
        assert!(st_check(&bytes[..n]).is_err(), "accepted at {n}");
    }
    let short = safetensors::check(&bytes[..50], bytes.len() as u64, &Limits::default());
    assert!(short.is_err_and(|e| e.msg.contains("the file ends after 42 of the")));
    let cut = |n: usize| bytes[..n].to_vec();
    refused(
        st_check,
        vec![
            (cut(7), "header", "length", "shorter than the 8-byte length"),
            (cut(100), "header", "length", "but only 92 bytes follow"),
            (
                cut(bytes.len() - 1),
                "tensor '",
                "data_offsets",
                "the data is only 407 bytes",
            ),
        ],
    );
}

#[rustfmt::skip]
#[test]
fn safetensors_refused() {
    let mut huge = st(ST, 408);
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let dup_inner = r#"{"w":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}"#;
    let extra = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#;
    refused(st_check, vec![
        // header
        (st("", 16), "header", "length", "is 0"),
        (huge, "header", "length", "exceeds the limit"),
        (st("{not json", 0), "header", "json", "key must be a string"),
        ([le(5u64, 8), b"{\"\xff\"}".to_vec()].concat(), "header", "json", "not UTF-8"),
        (st("[1, 2]", 0), "header", "json", "found an array"),
        (st(&"[".repeat(100_000), 0), "header", "json", "recursion limit exceeded"),
        (st(r#"{"a\nb":[]}"#, 0), "tensor 'a\\nb'", "entry", "expected an object"),
        (st(r#"{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]},"a":{}}"#, 1),
            "header", "json", "duplicate key 'a'"),
        (st(dup_inner, 4), "header", "json", "duplicate key 'dtype'"),
        (st(r#"{"__metadata__":{"k":3}}"#, 0), "__metadata__", "['k']", "expected a string"),
        (st(r#"{"__metadata__":[]}"#, 0), "__metadata__", "value", "expected an object"),
        // tensors
        (st1("F16", "[10,20]", "[0,300]", 400), "tensor 'w'", "data_offsets",
            "bytes 0..300 (300 bytes) but shape [10, 20] of F16 needs 400"),
        (st1("F99", "[1]", "[0,4]", 4), "tensor 'w'", "dtype", "unknown or unsupported dtype 'F99'"),
        (st1("F4", "[2]", "[0,1]", 4), "tensor 'w'", "dtype", "'F4'"),
        (st1("F32", "[-1]", "[0,4]", 4), "tensor 'w'", "shape", "entry 0 is -1, not a non-negative integer"),
        (st1("F32", "[1.5]", "[0,4]", 4), "tensor 'w'", "shape", "entry 0 is 1.5"),
        (st1("F32", "\"x\"", "[0,4]", 4), "tensor 'w'", "shape", "expected an array, found a string"),
        (st1("F32", "[1,1,1,1,1,1,1,1,1]", "[0,4]", 4), "tensor 'w'", "shape", "9 axes, more than 8"),
        (st1("F32", "[4294967296,4294967296]", "[0,4]", 4), "tensor 'w'", "shape", "overflows"),
        (st1("F32", "[1]", "[8,4]", 8), "tensor 'w'", "data_offsets", "begin 8 is after end 4"),
        (st1("F32", "[1]", "[0,4,8]", 8), "tensor 'w'", "data_offsets", "expected [begin, end]"),
        (st1("F32", "[1]", "[100,104]", 8), "tensor 'w'", "data_offsets", "the data is only 8 bytes"),
        (st(extra, 4), "tensor 'w'", "x", "unknown field"),
        (st(r#"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, 4), "tensor 'w'", "dtype", "missing"),
        (st(r#"{"w":[]}"#, 4), "tensor 'w'", "entry", "expected an object"),
        (st2("[0,4]", "[2,6]"), "tensor 'second'", "data_offsets",
            "bytes 2..6 overlap tensor 'first' at bytes 0..4"),
        (st2("[2,6]", "[0,4]"), "tensor 'first'", "data_offsets",
            "bytes 2..6 overlap tensor 'second' at bytes 0..4"),
        (st2("[0,4]", "[0,4]"), "tensor 'second'", "data_offsets", "overlap tensor 'first'"),
    ]);
    let limits = Limits { max_tensors: 1, max_header_bytes: 150, ..Limits::default() };
    let check = |b: &[u8]| safetensors::check_bytes(b, &limits);
    refused(check, vec![
        (st2("[0,4]", "[4,8]"), "header", "tensors", "more than 1 tensors"),
        (st(ST, 408), "header", "length", "exceeds the limit of 150 bytes"),
    ]);
}

// ---- fuzz ----

#[test]
fn fuzz_never_panics() {
    let seeds = [valid_gguf(), st(ST, 408)];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut accepted = 0;
    for i in 0..20_000 {
        let mut b = seeds[i % 2].clone();
        for _ in 0..1 + next() % 4 {
            let len = b.len() as u64 + 1;
            let (at, n) = ((next() % len) as usize, (next() % 16) as usize);
            let end = (at + n % 9).min(b.len());
            match next() % 5 {
                0 => b.truncate(at),
                1 => b
                    .iter_mut()
                    .skip(at)
                    .take(n % 3 + 1)
                    .for_each(|x| *x = next() as u8),
                // A random 8-byte word: lengths, counts and offsets.
                2 => b[at..end].copy_from_slice(&next().to_le_bytes()[..end - at]),
                3 => {
                    let from = (next() % len) as usize;
                    let chunk: Vec<u8> = b.iter().skip(from).take(n).copied().collect();
                    b.splice(at.min(b.len())..at.min(b.len()), chunk);
                }
                _ => drop(b.drain(at.min(b.len())..end)),
            }
        }
        accepted += usize::from(gguf_check(&b).is_ok());
        accepted += usize::from(st_check(&b).is_ok());
    }
    assert!(accepted < 10_000, "most mutations accepted: {accepted}");
}
