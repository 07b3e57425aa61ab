//! Tokenizers from GGUF metadata: the gemma3-270m SentencePiece vocabulary
//! against llama.cpp's ids (goldens/gemma3_270m_gguf/llama_cpp.json, when
//! present) and the `sentencepiece` package's (spm_tokenize.json); a small
//! synthetic vocabulary for byte fallback and the empty string; bad
//! vocabularies as errors naming the file and the field.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use lmspec::engine::gguf::GgufTokenizerData;
use lmspec::engine::Error;
use lmspec::lm::tokenizer::Tokenizer;

use crate::support::{goldens, json_ids, read_json, root};

fn gemma_file() -> PathBuf {
    root().join(".venv/models/gemma-3-270m-q4_k_m.gguf")
}

/// The gemma3-270m tokenizer, built once.
fn gemma() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let file = gemma_file();
        let t0 = Instant::now();
        let data = GgufTokenizerData::read(&file).expect("the gemma3 GGUF metadata reads");
        let t1 = Instant::now();
        let tok = Tokenizer::from_gguf(&data, &file).expect("the gemma3 tokenizer builds");
        eprintln!(
            "gemma3 tokenizer: metadata read in {:?}, built in {:?}",
            t1 - t0,
            t1.elapsed()
        );
        tok
    })
}

#[test]
fn gemma3_gguf_tokenizer_metadata() {
    let t = gemma();
    assert_eq!(t.vocab_size(), 262144);
    assert_eq!(t.bos_id, Some(2));
    assert_eq!(t.bos_token.as_deref(), Some("<bos>"));
    assert_eq!(t.eos_token.as_deref(), Some("<eos>"));
    // EOS, then `<end_of_turn>` and `</s>` (a user-defined HTML tag here), which
    // llama.cpp takes as ending generation by their text.
    assert_eq!(t.eos_ids, vec![1, 106, 212]);
    assert!(t.add_bos);
    assert_eq!(t.token_to_id("<0x0A>"), Some(248));
    assert_eq!(t.token_to_id("\u{2581}"), Some(236743));
}

#[test]
fn gemma3_gguf_tokenizer_matches_sentencepiece() {
    let t = gemma();
    let fixture = read_json(&goldens().join("gemma3_270m_gguf/spm_tokenize.json"));
    let cases = fixture["cases"].as_array().expect("cases");
    let mut wrong = Vec::new();
    for c in cases {
        let text = c["text"].as_str().expect("text");
        let want = json_ids(&c["ids"]);
        let got = t.tokenize(text, false, false).expect("encodes");
        if got != want {
            wrong.push(format!("{text:?}: got {got:?}, sentencepiece {want:?}"));
            continue;
        }
        let decoded = t.decode(&got, true).expect("decodes");
        // Text written with U+2581 comes back with spaces (both tokenizers).
        let plain = text.replace('\u{2581}', " ");
        if decoded != plain {
            wrong.push(format!("{text:?}: decodes to {decoded:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} strings differ:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}

#[test]
fn gemma3_gguf_tokenizer_matches_llama_cpp() {
    let path = goldens().join("gemma3_270m_gguf/llama_cpp.json");
    if !path.exists() {
        eprintln!("{} is not there yet: skipped", path.display());
        return;
    }
    let t = gemma();
    let fixture = read_json(&path);
    let mut wrong = Vec::new();
    let mut n = 0;
    for c in fixture["tokenize"].as_array().expect("tokenize") {
        n += 1;
        let text = c["text"].as_str().expect("text");
        let want = json_ids(&c["ids"]);
        let got = t.tokenize(text, false, false).expect("encodes");
        if got != want {
            wrong.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
            continue;
        }
        let decoded = t.decode(&got, true).expect("decodes");
        let want_text = c["detokenized"].as_str().expect("detokenized");
        if decoded != want_text {
            wrong.push(format!(
                "{text:?}: decodes to {decoded:?}, llama.cpp {want_text:?}"
            ));
        }
        if c["round_trip"].as_bool() == Some(true) && decoded != text {
            wrong.push(format!("{text:?}: does not round-trip: {decoded:?}"));
        }
    }
    for c in fixture["prompts"].as_array().expect("prompts") {
        n += 1;
        let text = c["text"].as_str().expect("text");
        let want = json_ids(&c["prompt_ids"]);
        // As llama.cpp: BOS added, control text not parsed.
        let got = t.tokenize(text, true, false).expect("encodes");
        if got != want {
            wrong.push(format!("prompt {text:?}: got {got:?}, llama.cpp {want:?}"));
        }
        // The prompt as generation encodes it (control text parsed): the same.
        assert_eq!(t.encode(text).expect("encodes"), got, "{text:?}");
    }
    if let Some(list) = fixture["special_true_for_contrast"].as_array() {
        for c in list {
            n += 1;
            let text = c["text"].as_str().expect("text");
            let want = json_ids(&c["ids_special_true"]);
            let got = t.tokenize(text, false, true).expect("encodes");
            if got != want {
                wrong.push(format!("special {text:?}: got {got:?}, llama.cpp {want:?}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {n} entries differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn gemma3_gguf_tokenizer_parses_control_text_when_asked() {
    let t = gemma();
    let text = "<start_of_turn>user\nHi<end_of_turn>\n";
    let ids = t.tokenize(text, false, true).expect("encodes");
    assert_eq!(ids.first(), Some(&105));
    assert!(ids.contains(&106));
    // `encode` (what generation uses) parses them too and adds BOS.
    assert_eq!(t.encode(text).expect("encodes")[1..], ids[..]);
    assert_eq!(t.decode(&ids, false).expect("decodes"), text);
    assert_eq!(t.decode(&ids, true).expect("decodes"), "user\nHi\n");
    // A long text tokenizes and round-trips.
    let long = "The quick brown fox jumps over the lazy dog, café 日本語 😀.\n".repeat(200);
    let t0 = Instant::now();
    let ids = t.encode(&long).expect("encodes");
    eprintln!(
        "{} chars -> {} ids in {:?}",
        long.len(),
        ids.len(),
        t0.elapsed()
    );
    assert_eq!(t.decode(&ids, true).expect("decodes"), long);
}

/// A small SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte
/// tokens, a few pieces, a user-defined `\n` and a control `<ctl>`.
fn small_vocab() -> GgufTokenizerData {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (t, s) in [
        ("\u{2581}", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("ab", -4.0),
        ("\u{2581}a", -5.0),
        ("\u{2581}ab", -0.5),
        ("c", -6.0),
    ] {
        tokens.push(t.into());
        types.push(1);
        scores.push(s);
    }
    tokens.push("\n".into());
    types.push(4);
    scores.push(0.0);
    tokens.push("<ctl>".into());
    types.push(3);
    scores.push(0.0);
    GgufTokenizerData {
        model: Some("llama".into()),
        tokens,
        scores: Some(scores),
        token_types: types,
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        add_bos: true,
        add_space_prefix: Some(false),
        ..Default::default()
    }
}

fn small() -> Tokenizer {
    Tokenizer::from_gguf(&small_vocab(), Path::new("small.gguf")).expect("builds")
}

#[test]
fn spm_merges_by_score_and_falls_back_to_bytes() {
    let t = small();
    let id = |s: &str| t.token_to_id(s).unwrap();
    assert_eq!(t.tokenize("ab", false, false).unwrap(), vec![id("ab")]);
    // "ab" (-4) merges before "▁a" (-5); then "▁ab" (-0.5).
    assert_eq!(
        t.tokenize(" ab", false, false).unwrap(),
        vec![id("\u{2581}ab")]
    );
    assert_eq!(
        t.tokenize("ab c", false, false).unwrap(),
        vec![id("ab"), id("\u{2581}"), id("c")]
    );
    // Characters not in the vocabulary: their UTF-8 bytes.
    let e = t.tokenize("é", false, false).unwrap();
    assert_eq!(e, vec![id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(t.decode(&e, true).unwrap(), "é");
    // Half a character decodes to U+FFFD.
    assert_eq!(t.decode(&e[..1], true).unwrap(), "\u{FFFD}");
    // User-defined tokens are matched in plain text, control tokens only when asked.
    let nl = id("\n");
    assert_eq!(
        t.tokenize("a\nb", false, false).unwrap(),
        vec![id("a"), nl, id("b")]
    );
    let ctl = id("<ctl>");
    assert_eq!(t.tokenize("<ctl>", false, false).unwrap().len(), 5);
    assert_eq!(t.tokenize("<ctl>", false, true).unwrap(), vec![ctl]);
    assert_eq!(t.decode(&[ctl, id("a")], false).unwrap(), "<ctl>a");
    assert_eq!(t.decode(&[ctl, id("a")], true).unwrap(), "a");
    // BOS once.
    assert_eq!(t.encode("a").unwrap(), vec![1, id("a")]);
    assert_eq!(t.encode("<s>a").unwrap(), vec![1, id("a")]);
}

#[test]
fn spm_empty_string_and_space_prefix() {
    let t = small();
    assert_eq!(t.tokenize("", false, false).unwrap(), Vec::<u32>::new());
    assert_eq!(t.encode("").unwrap(), vec![1]);
    assert_eq!(t.decode(&[], true).unwrap(), "");
    let mut data = small_vocab();
    data.add_space_prefix = None; // llama.cpp's default: a prefix space
    let t = Tokenizer::from_gguf(&data, Path::new("small.gguf")).unwrap();
    let ids = t.tokenize("ab", false, false).unwrap();
    assert_eq!(ids, vec![t.token_to_id("\u{2581}ab").unwrap()]);
    // The prefix space is taken off again.
    assert_eq!(t.decode(&ids, true).unwrap(), "ab");
}

fn expect_error(data: &GgufTokenizerData, field: &str) {
    let file = Path::new("/models/bad.gguf");
    match Tokenizer::from_gguf(data, file) {
        Err(e @ Error::Tokenizer { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("/models/bad.gguf") && msg.contains(field),
                "{field}: {msg}"
            );
        }
        Err(other) => panic!("{field}: unexpected error {other}"),
        Ok(_) => panic!("{field}: a bad vocabulary was accepted"),
    }
}

#[test]
fn spm_bad_vocabularies_are_errors() {
    let mut d = small_vocab();
    d.eos_id = Some(100_000);
    expect_error(&d, "tokenizer.ggml.eos_token_id");
    let mut d = small_vocab();
    d.pad_id = Some(d.tokens.len() as u32);
    expect_error(&d, "tokenizer.ggml.padding_token_id");
    let mut d = small_vocab();
    d.scores = None;
    expect_error(&d, "tokenizer.ggml.scores");
    let mut d = small_vocab();
    d.scores.as_mut().unwrap().pop();
    expect_error(&d, "tokenizer.ggml.scores");
    let mut d = small_vocab();
    d.scores.as_mut().unwrap()[5] = f32::NAN;
    expect_error(&d, "tokenizer.ggml.scores[5]");
    let mut d = small_vocab();
    d.token_types.truncate(3);
    expect_error(&d, "tokenizer.ggml.token_type");
    let mut d = small_vocab();
    d.tokens[3] = "<0xZZ>".into();
    expect_error(&d, "tokenizer.ggml.tokens[3]");
    let mut d = small_vocab();
    d.tokens[261] = "a".into();
    expect_error(&d, "tokenizer.ggml.tokens[261]");
    let mut d = small_vocab();
    d.tokens.clear();
    expect_error(&d, "tokenizer.ggml.tokens");
    let mut d = small_vocab();
    d.model = Some("wordpiece".into());
    expect_error(&d, "wordpiece");
    // Ids past the vocabulary in decode: an error, no panic.
    let t = small();
    assert!(t.decode(&[1_000_000], true).is_err());
}

/// A GGUF file (version 3, no tensors) with the given metadata, each value
/// written as (type id, bytes).
fn gguf_bytes(kv: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, ty, v) in kv {
        b.extend((k.len() as u64).to_le_bytes());
        b.extend(k.as_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(v);
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b
}

fn gguf_string(s: &[u8]) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s);
    b
}

fn gguf_array(elem_ty: u32, items: &[Vec<u8>]) -> Vec<u8> {
    let mut b = elem_ty.to_le_bytes().to_vec();
    b.extend((items.len() as u64).to_le_bytes());
    for i in items {
        b.extend(i);
    }
    b
}

#[test]
fn gguf_tokenizer_metadata_errors_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, kv: &[(&str, u32, Vec<u8>)]| {
        let p = dir.path().join(name);
        std::fs::write(&p, gguf_bytes(kv)).unwrap();
        p
    };
    let model = ("tokenizer.ggml.model", 8, gguf_string(b"llama"));
    // A token that is not UTF-8.
    let p = write(
        "utf8.gguf",
        &[
            model.clone(),
            (
                "tokenizer.ggml.tokens",
                9,
                gguf_array(8, &[gguf_string(b"a"), gguf_string(b"\xff\xfe")]),
            ),
        ],
    );
    let msg = GgufTokenizerData::read(&p).unwrap_err().to_string();
    assert!(
        msg.contains("utf8.gguf") && msg.contains("tokenizer.ggml.tokens") && msg.contains("UTF-8"),
        "{msg}"
    );
    // Scores that are strings.
    let p = write(
        "scores.gguf",
        &[
            model.clone(),
            (
                "tokenizer.ggml.tokens",
                9,
                gguf_array(8, &[gguf_string(b"a")]),
            ),
            (
                "tokenizer.ggml.scores",
                9,
                gguf_array(8, &[gguf_string(b"x")]),
            ),
        ],
    );
    let msg = GgufTokenizerData::read(&p).unwrap_err().to_string();
    assert!(
        msg.contains("scores.gguf") && msg.contains("tokenizer.ggml.scores[0]"),
        "{msg}"
    );
    // A token list shorter than the BOS id.
    let p = write(
        "short.gguf",
        &[
            model,
            (
                "tokenizer.ggml.tokens",
                9,
                gguf_array(8, &[gguf_string(b"a")]),
            ),
            (
                "tokenizer.ggml.scores",
                9,
                gguf_array(6, &[0f32.to_le_bytes().to_vec()]),
            ),
            (
                "tokenizer.ggml.bos_token_id",
                4,
                7u32.to_le_bytes().to_vec(),
            ),
        ],
    );
    let data = GgufTokenizerData::read(&p).expect("reads");
    assert_eq!(data.scores, Some(vec![0.0]));
    // No add_bos_token: llama.cpp adds BOS for a SentencePiece vocabulary.
    assert!(data.add_bos);
    assert_eq!(data.add_space_prefix, None);
    let msg = Tokenizer::from_gguf(&data, &p).unwrap_err().to_string();
    assert!(
        msg.contains("short.gguf") && msg.contains("tokenizer.ggml.bos_token_id"),
        "{msg}"
    );
}

/// A small byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`) whose
/// merges join the digits 1..5, with a user-defined `<ud>`.
fn digits_bpe(pre: Option<&str>) -> GgufTokenizerData {
    let tokens: Vec<String> = [
        "1", "2", "3", "4", "5", "12", "123", "1234", "12345", "45", "<ud>", "<|ctl|>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut token_types = vec![1; tokens.len()];
    token_types[10] = 4;
    token_types[11] = 3;
    GgufTokenizerData {
        model: Some("gpt2".into()),
        pre: pre.map(str::to_string),
        tokens,
        merges: ["1 2", "12 3", "123 4", "1234 5", "4 5"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        token_types,
        ..Default::default()
    }
}

#[test]
fn bpe_pre_tokenizers_split_as_llama_cpp() {
    let pieces_parsed = |pre: Option<&str>, text: &str, parse_special: bool| -> Vec<String> {
        let t = Tokenizer::from_gguf(&digits_bpe(pre), Path::new("bpe.gguf")).expect("builds");
        t.tokenize(text, false, parse_special)
            .expect("encodes")
            .iter()
            .map(|&i| t.decode(&[i], false).unwrap())
            .collect()
    };
    let pieces = |pre: Option<&str>, text: &str| pieces_parsed(pre, text, false);
    // Digits one by one.
    for pre in [
        "smollm",
        "starcoder",
        "qwen2",
        "stablelm2",
        "deepseek-coder",
    ] {
        assert_eq!(
            pieces(Some(pre), "12345"),
            ["1", "2", "3", "4", "5"],
            "{pre}"
        );
    }
    // Digit runs whole.
    for pre in ["gpt-2", "mpt", "olmo"] {
        assert_eq!(pieces(Some(pre), "12345"), ["12345"], "{pre}");
    }
    // Groups of three.
    for pre in [
        None,
        Some("default"),
        Some("llama-bpe"),
        Some("dbrx"),
        Some("deepseek-v3"),
        Some("gpt-4o"),
    ] {
        assert_eq!(pieces(pre, "12345"), ["123", "45"], "{pre:?}");
    }
    // User-defined tokens are matched in any text, control ones when parsed.
    assert_eq!(pieces(Some("smollm"), "1<ud>2"), ["1", "<ud>", "2"]);
    assert_eq!(
        pieces_parsed(Some("gpt-2"), "12<|ctl|>3", true),
        ["12", "<|ctl|>", "3"]
    );
    // Unparsed, its characters are not in this vocabulary.
    assert_eq!(pieces(Some("gpt-2"), "12<|ctl|>3"), ["12", "3"]);
    let err = Tokenizer::from_gguf(&digits_bpe(Some("no-such-pre")), Path::new("bpe.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bpe.gguf")
            && err.contains("tokenizer.ggml.pre")
            && err.contains("no-such-pre"),
        "{err}"
    );
}

#[test]
fn gemma3_gguf_tokenizer_round_trips_random_text() {
    let t = gemma();
    let pool: Vec<char> = "abcXYZ019 .,;:!?'\"<>/()[]{}\t\n\r  éßøñ日本語中文한국어Привет😀👍🏽\u{200b}\u{a0}\u{feff}\u{0}\u{7f}"
        .chars()
        .collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    for _ in 0..300 {
        let len = next() % 40;
        let text: String = (0..len).map(|_| pool[next() % pool.len()]).collect();
        for parse_special in [false, true] {
            let ids = t.tokenize(&text, false, parse_special).expect("encodes");
            assert_eq!(t.decode(&ids, true).expect("decodes"), text, "{text:?}");
        }
    }
}
