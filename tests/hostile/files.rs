//! Builders of the corpus's files: a tiny tokenizer, safetensors rewritten
//! from the golden llama, and GGUF files written from scratch.
use std::fs;

use serde_json::{json, Map, Value};

use crate::support::goldens;

pub const CHAT_TEMPLATE: &str = "{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant{% endif %}";

/// A word-level tokenizer with `n` ids: `<unk>`, `<s>`, `</s>`, a few words,
/// then `w7`, `w8`, ...
pub fn tokenizer_json(n: usize) -> String {
    let mut vocab = Map::new();
    let named = [
        "<unk>",
        "<s>",
        "</s>",
        "hello",
        "world",
        "user",
        "assistant",
    ];
    for i in 0..n {
        let word = named
            .get(i)
            .map(|w| w.to_string())
            .unwrap_or(format!("w{i}"));
        vocab.insert(word, json!(i));
    }
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

/// The golden llama's safetensors, split into its header and data.
pub fn golden_safetensors() -> (Map<String, Value>, Vec<u8>) {
    safetensors_of("llama")
}

/// A golden case's safetensors, split into its header and data.
pub fn safetensors_of(case: &str) -> (Map<String, Value>, Vec<u8>) {
    let bytes = fs::read(goldens().join(case).join("model/model.safetensors")).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    (header, bytes[8 + n..].to_vec())
}

/// A safetensors file from a header text and data.
pub fn safetensors_raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// The golden llama's safetensors after `edit` changed its header and data.
pub fn safetensors_with(edit: impl FnOnce(&mut Map<String, Value>, &mut Vec<u8>)) -> Vec<u8> {
    safetensors_of_with("llama", edit)
}

/// A golden case's safetensors after `edit` changed its header and data.
pub fn safetensors_of_with(
    case: &str,
    edit: impl FnOnce(&mut Map<String, Value>, &mut Vec<u8>),
) -> Vec<u8> {
    let (mut header, mut data) = safetensors_of(case);
    edit(&mut header, &mut data);
    safetensors_raw(&Value::Object(header).to_string(), &data)
}

/// A GGUF metadata value.
#[derive(Clone)]
pub enum Gv {
    U32(u32),
    I32(i32),
    F32(f32),
    U64(u64),
    Str(String),
    Strs(Vec<String>),
    /// Raw bytes written after the type tag (for hostile encodings).
    Raw(u32, Vec<u8>),
}

/// A GGUF file being written: version, metadata, tensor infos and data.
#[derive(Clone)]
pub struct Gguf {
    pub magic: [u8; 4],
    pub version: u32,
    pub kvs: Vec<(String, Gv)>,
    /// name, dims (GGUF order: fastest first), ggml type, offset.
    pub tensors: Vec<(String, Vec<u64>, u32, u64)>,
    pub data: Vec<u8>,
    pub alignment: usize,
    /// Overrides the written counts (tensors, metadata).
    pub counts: Option<(u64, u64)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Gguf {
    /// A whole tiny llama (one layer, width 8, 16 tokens), float32.
    pub fn tiny_llama() -> Gguf {
        let (d, ff, vocab) = (8u64, 16u64, 16u64);
        let tokens: Vec<String> = (0..vocab).map(|i| format!("t{i}")).collect();
        let kvs = vec![
            ("general.architecture".into(), Gv::Str("llama".into())),
            ("llama.block_count".into(), Gv::U32(1)),
            ("llama.embedding_length".into(), Gv::U32(d as u32)),
            ("llama.attention.head_count".into(), Gv::U32(2)),
            ("llama.attention.head_count_kv".into(), Gv::U32(2)),
            ("llama.feed_forward_length".into(), Gv::U32(ff as u32)),
            ("llama.context_length".into(), Gv::U32(64)),
            ("llama.rope.freq_base".into(), Gv::F32(10000.0)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Gv::F32(1e-5),
            ),
            ("tokenizer.ggml.model".into(), Gv::Str("gpt2".into())),
            ("tokenizer.ggml.tokens".into(), Gv::Strs(tokens)),
        ];
        let shapes: Vec<(&str, Vec<u64>)> = vec![
            ("token_embd.weight", vec![d, vocab]),
            ("output_norm.weight", vec![d]),
            ("blk.0.attn_norm.weight", vec![d]),
            ("blk.0.attn_q.weight", vec![d, d]),
            ("blk.0.attn_k.weight", vec![d, d]),
            ("blk.0.attn_v.weight", vec![d, d]),
            ("blk.0.attn_output.weight", vec![d, d]),
            ("blk.0.ffn_norm.weight", vec![d]),
            ("blk.0.ffn_gate.weight", vec![d, ff]),
            ("blk.0.ffn_up.weight", vec![d, ff]),
            ("blk.0.ffn_down.weight", vec![ff, d]),
        ];
        let mut g = Gguf {
            magic: *b"GGUF",
            version: 3,
            kvs,
            tensors: Vec::new(),
            data: Vec::new(),
            alignment: 32,
            counts: None,
        };
        for (name, dims) in shapes {
            g.push_f32(name, dims);
        }
        g
    }

    /// Appends a float32 tensor with small deterministic values.
    pub fn push_f32(&mut self, name: &str, dims: Vec<u64>) {
        while self.data.len() % self.alignment != 0 {
            self.data.push(0);
        }
        let offset = self.data.len() as u64;
        let n: u64 = dims.iter().product();
        for i in 0..n {
            let x = ((i * 7919 % 97) as f32 - 48.0) / 200.0;
            self.data.extend_from_slice(&x.to_le_bytes());
        }
        self.tensors.push((name.into(), dims, 0, offset));
    }

    pub fn set(&mut self, key: &str, v: Gv) -> &mut Gguf {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = v,
            None => self.kvs.push((key.into(), v)),
        }
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        let (nt, nk) = self
            .counts
            .unwrap_or((self.tensors.len() as u64, self.kvs.len() as u64));
        out.extend_from_slice(&nt.to_le_bytes());
        out.extend_from_slice(&nk.to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            match v {
                Gv::U32(x) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Gv::I32(x) => {
                    out.extend_from_slice(&5u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Gv::F32(x) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Gv::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                Gv::U64(x) => {
                    out.extend_from_slice(&10u32.to_le_bytes());
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Gv::Strs(list) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(list.len() as u64).to_le_bytes());
                    for s in list {
                        put_str(&mut out, s);
                    }
                }
                Gv::Raw(t, bytes) => {
                    out.extend_from_slice(&t.to_le_bytes());
                    out.extend_from_slice(bytes);
                }
            }
        }
        for (name, dims, ty, offset) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        while out.len() % self.alignment != 0 {
            out.push(0);
        }
        out.extend_from_slice(&self.data);
        out
    }
}
