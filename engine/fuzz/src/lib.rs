//! Fuzz targets: one function per parser of untrusted input. Each takes
//! arbitrary bytes and must return (an error is fine) without panicking,
//! overflowing the stack, or running away with time or memory.
//!
//! `make fuzz` runs them under libFuzzer through cargo-fuzz (the crate in
//! `cargo-fuzz/`, nightly only); [`run_seeded`] runs them on seeded
//! mutations of [`seeds`] on stable, a short pass of which is part of the
//! test suite.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lmspec_formats::Limits;
use lmspec_lm::template::{ChatContext, ChatTemplate};
use lmspec_lm::tokenizer::Tokenizer;
use lmspec_lm::tools::ToolFormat;
use lmspec_spec::library::{SpecLibrary, SpecRoot};

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name, in the order `make fuzz` runs them.
pub const TARGETS: &[(&str, Target)] = &[
    ("expr", expr),
    ("spec_yaml", spec_yaml),
    ("config_bind", config_bind),
    ("safetensors_header", safetensors_header),
    ("gguf_header", gguf_header),
    ("chat_template", chat_template),
    ("tool_calls", tool_calls),
    ("tokenizer", tokenizer),
    ("image", image),
    ("image_processor", image_processor),
];

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

fn library() -> &'static SpecLibrary {
    static LIB: OnceLock<SpecLibrary> = OnceLock::new();
    LIB.get_or_init(|| SpecLibrary::embedded().unwrap_or_else(|e| panic!("built-in specs: {e}")))
}

/// A spec expression: parsed, then evaluated with a few names bound.
pub fn expr(data: &[u8]) {
    use lmspec_spec::expr::{Expr, Value};
    let Some(src) = text(data) else { return };
    let Ok(e) = Expr::parse(src) else { return };
    let names: indexmap::IndexMap<String, Value> = [
        ("hidden_size", Value::Int(64)),
        ("n_heads", Value::Int(4)),
        ("eps", Value::Float(1e-5)),
        ("name", Value::Str("decoder".into())),
        ("i", Value::Int(3)),
        ("list", Value::List(vec![Value::Int(1), Value::Null])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let _ = e.eval(&names);
}

/// A spec file: parsed, resolved against the built-in library, checked.
pub fn spec_yaml(data: &[u8]) {
    let Some(src) = text(data) else { return };
    if let Ok(spec) = library().load_text(src, Path::new("fuzz.yaml")) {
        let _ = lmspec_spec::check(&spec);
    }
}

/// A `config.json`: bound to every built-in spec and expanded.
pub fn config_bind(data: &[u8]) {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let lib = library();
    for name in lib.names() {
        if let Ok(spec) = lib.load(name) {
            let _ = lmspec_spec::expand_for(&spec, &json, Path::new("config.json"));
        }
    }
}

/// A safetensors file's header.
pub fn safetensors_header(data: &[u8]) {
    let _ = lmspec_formats::safetensors::check_bytes(data, &Limits::default());
}

/// A GGUF file's header and tensor table, then each tensor's data.
pub fn gguf_header(data: &[u8]) {
    let Ok(h) = lmspec_formats::gguf::check_bytes(data, &Limits::default()) else {
        return;
    };
    for t in &h.tensors {
        let start = h.data_start.saturating_add(t.offset);
        let end = start.saturating_add(t.bytes);
        let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
            continue;
        };
        if let Some(bytes) = data.get(start..end) {
            let _ = lmspec_formats::gguf_data::decode(t, bytes);
        }
    }
}

/// A chat template, rendered over a conversation with tools.
pub fn chat_template(data: &[u8]) {
    let Some(src) = text(data) else { return };
    let Ok(t) = ChatTemplate::new(src, Path::new("chat_template.jinja")) else {
        return;
    };
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"},
    ]);
    let ctx = ChatContext {
        tools: Some(serde_json::json!([{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}}}}])),
        add_generation_prompt: true,
        ..Default::default()
    };
    let _ = t.render(&messages, &ctx);
}

/// Model output read for tool calls in every built-in tool format.
pub fn tool_calls(data: &[u8]) {
    static FORMATS: OnceLock<Vec<ToolFormat>> = OnceLock::new();
    let Some(out) = text(data) else { return };
    let formats = FORMATS.get_or_init(|| {
        ToolFormat::load_all(&SpecRoot::Embedded)
            .unwrap_or_else(|e| panic!("built-in tool formats: {e}"))
    });
    let tools = ["get_weather".to_string(), "f".to_string()];
    for f in formats {
        let _ = lmspec_lm::tools::parse_all(f, &tools, out);
    }
}

/// A `tokenizer.json`: loaded, then encoding and decoding a text.
pub fn tokenizer(data: &[u8]) {
    let Ok(t) = Tokenizer::from_json(data, Path::new("tokenizer.json")) else {
        return;
    };
    if let Ok(ids) = t.encode("Hello, world! <|im_start|>user 123") {
        let _ = t.decode(&ids, false);
        let _ = t.decode(&[0, 1, 2, u32::MAX], true);
    }
}

/// The processor settings the `image` target runs (small pixel bounds).
const PROCESSOR: &str = r#"{"patch_size": 4, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 256, "max_pixels": 4096, "resample": 3, "rescale_factor": 0.00392156862745098, "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}"#;

/// An image file (PNG, JPEG): decoded, then processed into patches.
pub fn image(data: &[u8]) {
    use lmspec_lm::image_processor::{decode_rgb, ImageProcessor};
    static PROC: OnceLock<ImageProcessor> = OnceLock::new();
    let proc = PROC.get_or_init(|| {
        let j = serde_json::from_str(PROCESSOR).unwrap_or_else(|e| panic!("processor: {e}"));
        ImageProcessor::from_json(&j, Path::new("preprocessor_config.json"))
            .unwrap_or_else(|e| panic!("processor: {e}"))
    });
    let Ok(img) = decode_rgb(data, Path::new("image")) else {
        return;
    };
    // Decoding is bounded by the decoder's limits; resizing a huge image
    // is slow, not wrong: keep the fuzzer's inputs quick.
    if img.width * img.height <= 1 << 20 {
        let _ = proc.process(&img);
    }
}

/// A `preprocessor_config.json`: parsed, then a small image processed
/// with it (when its target size stays small).
pub fn image_processor(data: &[u8]) {
    use lmspec_lm::image_processor::{ImageProcessor, RgbImage};
    let Ok(j) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(p) = ImageProcessor::from_json(&j, Path::new("preprocessor_config.json")) else {
        return;
    };
    let img = RgbImage {
        width: 7,
        height: 5,
        data: (0..105).map(|v| (v * 7) as u8).collect(),
    };
    match p.target_size(5, 7) {
        Ok((h, w)) if h * w * p.temporal_patch_size <= 1 << 20 => {
            let _ = p.process(&img);
        }
        _ => {}
    }
}

/// The project's root (for seed files).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn files(dir: &str, ext: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(root().join(dir)) {
        let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            if p.extension().is_some_and(|x| x == ext) {
                out.extend(std::fs::read(&p).ok());
            }
        }
    }
    out
}

/// Starting inputs for `target`: the project's own specs, configs,
/// templates and formats, and small files written here.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let strs = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect();
    match target {
        "expr" => strs(&[
            "hidden_size // n_heads",
            "eps * 2 if i % 2 == 0 else -eps",
            "max(1, min(hidden_size, 7)) ** 2",
            "name in ['decoder', 'encoder'] and not (list[0] == 1)",
            "get(set(null, 'a', 1), 'a', 0) + len('abc')",
            "int(sqrt(float(hidden_size))) - abs(-3) + floor(2.5) + ceil(bf16(0.1))",
        ]),
        "spec_yaml" => files("specs/models", "yaml"),
        "config_bind" => {
            let mut out = Vec::new();
            if let Ok(rd) = std::fs::read_dir(root().join("goldens")) {
                let mut dirs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                dirs.sort();
                for d in dirs {
                    out.extend(std::fs::read(d.join("model/config.json")).ok());
                }
            }
            out
        }
        "safetensors_header" => vec![small_safetensors()],
        "gguf_header" => vec![small_gguf()],
        "chat_template" => {
            let mut out = files("goldens/templates", "jinja");
            out.push(b"{% for m in messages %}{{ m.role }}: {{ m.content | tojson }}\n{% endfor %}{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}".to_vec());
            out
        }
        "tool_calls" => strs(&[
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": [1, {\"b\": null}]}}</tool_call>",
            "<|tool_call_start|>[f(a='v', n=1, l=[1, (2, 3)], d={'k': True})]<|tool_call_end|>",
            "<start_function_call>call:f{a:<escape>x<escape>,b:[1,2],c:{d:3}}<end_function_call>",
            "[TOOL_CALLS]f[ARGS]{\"a\": 1}",
            "<function=f><parameter=a>1</parameter></function>",
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"f\"}",
            "<think>hmm</think>text<tool_call>{\"name\": \"f\"",
        ]),
        "tokenizer" => vec![
            br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":3,"content":"<|im_start|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":{"type":"Lowercase"},"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"hello":0,"world":1,"[UNK]":2},"unk_token":"[UNK]"}}"#.to_vec(),
            br#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},"post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"vocab":{"H":0,"e":1,"l":2,"o":3,"He":4,"ll":5},"merges":["H e","l l"]}}"#.to_vec(),
        ],
        "image" => files("goldens/vlm/images", "png")
            .into_iter()
            .chain(files("goldens/vlm/images", "jpg"))
            .collect(),
        "image_processor" => {
            let mut out = vec![PROCESSOR.as_bytes().to_vec()];
            out.extend(std::fs::read(root().join("goldens/vlm/qwen2_vl/model/preprocessor_config.json")).ok());
            out
        }
        _ => Vec::new(),
    }
}

/// A two-tensor safetensors file.
fn small_safetensors() -> Vec<u8> {
    let header = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend((0..22u8).collect::<Vec<u8>>());
    out
}

/// A small GGUF file: a few metadata kinds and two tensors.
fn small_gguf() -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&2u64.to_le_bytes());
    out.extend_from_slice(&3u64.to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend_from_slice(&8u32.to_le_bytes());
    string(&mut out, "arch");
    string(&mut out, "arch.block_count");
    out.extend_from_slice(&4u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    string(&mut out, "tokenizer.ggml.tokens");
    out.extend_from_slice(&9u32.to_le_bytes());
    out.extend_from_slice(&8u32.to_le_bytes());
    out.extend_from_slice(&2u64.to_le_bytes());
    string(&mut out, "a");
    string(&mut out, "b");
    for (name, dims, offset) in [("w", [4u64, 2], 0u64), ("v", [4, 1], 32)] {
        string(&mut out, name);
        out.extend_from_slice(&2u32.to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    out.extend(std::iter::repeat_n(0u8, 48));
    out
}

/// A small deterministic generator (xorshift64*).
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that often matter to parsers.
const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"{",
    b"}",
    b"[",
    b"]",
    b"(",
    b")",
    b"\"",
    b"'",
    b":",
    b",",
    b"\n",
    b"-1",
    b"0",
    b"9223372036854775807",
    b"1e308",
    b"NaN",
    b"{%",
    b"%}",
    b"{{",
    b"}}",
    b"null",
    b"\\",
];

/// One mutation of `input`: flip, overwrite, insert or delete bytes, splice
/// in a token parsers care about or a piece of `other`, or repeat a piece.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(7) {
            0 if !v.is_empty() => {
                let k = rng.below(v.len());
                v[k] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let k = rng.below(v.len());
                v[k] = rng.next() as u8;
            }
            2 => {
                let tok = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(at..at, tok.iter().copied());
            }
            3 if !v.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at.min(end)..end);
            }
            4 if !other.is_empty() => {
                let s = rng.below(other.len());
                let e = (s + 1 + rng.below(64)).min(other.len());
                v.splice(at..at, other[s..e].iter().copied());
            }
            5 if !v.is_empty() => {
                let s = rng.below(v.len());
                let e = (s + 1 + rng.below(8)).min(v.len());
                let piece: Vec<u8> = v[s..e].to_vec();
                for _ in 0..rng.below(64) {
                    v.splice(at..at, piece.iter().copied());
                }
            }
            _ => v.truncate(at),
        }
    }
    v
}

/// Runs `target` on every seed and on `iterations` seeded mutations of
/// them; returns how many inputs ran. A panic propagates (the caller's
/// test fails with it).
pub fn run_seeded(target: fn(&[u8]), seeds: &[Vec<u8>], iterations: usize, seed: u64) -> usize {
    let mut rng = Rng(seed | 1);
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    if pool.is_empty() {
        pool.push(Vec::new());
    }
    for s in &pool {
        target(s);
    }
    for _ in 0..iterations {
        let a = rng.below(pool.len());
        let b = rng.below(pool.len());
        let input = mutate(&mut rng, &pool[a], &pool[b]);
        target(&input);
        // Keep some mutants (at most 256), so later rounds build on
        // earlier ones.
        if rng.below(8) == 0 && input.len() < 1 << 20 {
            if pool.len() < 256 {
                pool.push(input);
            } else {
                let k = rng.below(pool.len());
                pool[k] = input;
            }
        }
    }
    pool.len() + iterations
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_seeds() {
        for (name, _) in TARGETS {
            assert!(!seeds(name).is_empty(), "{name} has no seeds");
        }
    }
}
