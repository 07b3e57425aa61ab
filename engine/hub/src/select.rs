//! Which files of a repository a model needs.

/// Files beside the weights that a model may read: config, tokenizer,
/// chat template, generation defaults, processor and pooling configs.
const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
];

/// A sentence-transformers Dense module's file (`2_Dense/config.json`,
/// `2_Dense/model.safetensors`).
fn is_dense_file(f: &str) -> bool {
    let Some((folder, name)) = f.split_once('/') else {
        return false;
    };
    let numbered = folder
        .strip_suffix("_Dense")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    numbered && matches!(name, "config.json" | "model.safetensors")
}

/// The sharded-checkpoint index.
pub const INDEX: &str = "model.safetensors.index.json";

/// GGUF quantizations in the order a repository's file is chosen by
/// default when it holds several and none was asked for.
const GGUF_PREFERENCE: &[&str] = &["Q4_K_M", "Q4_0", "Q4_1", "Q5_K_M", "Q8_0", "Q6_K", "F16"];

/// What to fetch: a safetensors checkpoint or one GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// `config.json`, the weights (the index first, when sharded) and the
    /// side files the repository has.
    Safetensors {
        side: Vec<String>,
        index: Option<String>,
        weights: Vec<String>,
    },
    /// One `.gguf` file (it carries its config and tokenizer) and the side
    /// files the repository has (a chat template, generation defaults).
    Gguf { file: String, side: Vec<String> },
}

impl Plan {
    /// Every file of the plan except the index's shards when they are not
    /// known yet.
    pub fn files(&self) -> Vec<String> {
        match self {
            Plan::Safetensors {
                side,
                index,
                weights,
            } => side
                .iter()
                .chain(index.iter())
                .chain(weights.iter())
                .cloned()
                .collect(),
            Plan::Gguf { file, side } => std::iter::once(file).chain(side).cloned().collect(),
        }
    }
}

/// Plans the fetch from the repository's file list. `gguf` picks a GGUF
/// file by name or quantization (and selects GGUF over safetensors when the
/// repository has both). Errors are plain sentences; the caller adds the
/// repository.
pub fn plan(files: &[String], gguf: Option<&str>) -> Result<Plan, String> {
    let has = |f: &str| files.iter().any(|x| x == f);
    let mut side: Vec<String> = SIDE_FILES
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    side.extend(files.iter().filter(|f| is_dense_file(f)).cloned());
    let ggufs: Vec<&String> = files
        .iter()
        .filter(|f| f.to_ascii_lowercase().ends_with(".gguf"))
        .filter(|f| !file_name(f).to_ascii_lowercase().starts_with("mmproj"))
        .collect();
    if gguf.is_some() || (!has("config.json") && !ggufs.is_empty()) {
        let file = choose_gguf(&ggufs, gguf)?;
        let side = side.into_iter().filter(|f| f != "config.json").collect();
        return Ok(Plan::Gguf { file, side });
    }
    if !has("config.json") {
        return Err("the repository has no config.json and no .gguf file".into());
    }
    if has(INDEX) {
        return Ok(Plan::Safetensors {
            side,
            index: Some(INDEX.into()),
            weights: Vec::new(),
        });
    }
    let weights: Vec<String> = files
        .iter()
        .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
        .cloned()
        .collect();
    if weights.is_empty() {
        return Err("the repository has a config.json but no .safetensors weights".into());
    }
    Ok(Plan::Safetensors {
        side,
        index: None,
        weights,
    })
}

/// The shard names of a `model.safetensors.index.json`, each once, in
/// order of first use.
pub fn index_shards(text: &str) -> Result<Vec<String>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("weight_map: missing or not an object")?;
    let mut shards: Vec<String> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| format!("weight_map[{tensor:?}]: not a file name"))?;
        let safe = !shard.is_empty()
            && !shard.starts_with('/')
            && !shard.split('/').any(|part| part == ".." || part.is_empty())
            && shard.ends_with(".safetensors");
        if !safe {
            return Err(format!(
                "weight_map[{tensor:?}]: {shard:?} is not a .safetensors file inside the repository"
            ));
        }
        if !shards.iter().any(|s| s == shard) {
            shards.push(shard.to_string());
        }
    }
    if shards.is_empty() {
        return Err("weight_map: empty".into());
    }
    Ok(shards)
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn choose_gguf(ggufs: &[&String], wanted: Option<&str>) -> Result<String, String> {
    let names = || {
        ggufs
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if ggufs.is_empty() {
        return Err("--gguf-file was given but the repository has no .gguf file".into());
    }
    // Split files (NAME-00001-of-00003.gguf) are one model in several parts.
    let whole: Vec<&&String> = ggufs.iter().filter(|f| !is_split_part(f)).collect();
    let by_quant = |q: &str| -> Vec<&String> {
        let q = q.to_ascii_lowercase();
        whole
            .iter()
            .filter(|f| {
                let stem = file_name(f).to_ascii_lowercase();
                let stem = stem.trim_end_matches(".gguf");
                stem.split(['-', '.', '_'])
                    .collect::<Vec<_>>()
                    .windows(q.split('_').count())
                    .any(|w| w.join("_") == q)
            })
            .map(|f| **f)
            .collect()
    };
    if let Some(want) = wanted {
        if let Some(f) = ggufs
            .iter()
            .find(|f| f.as_str() == want || file_name(f) == want)
        {
            if is_split_part(f) {
                return Err(format!(
                    "{f} is one part of a split GGUF, which is not supported"
                ));
            }
            return Ok(f.to_string());
        }
        return match by_quant(want).as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(format!(
                "no .gguf file matches {want:?}; the repository has {}",
                names()
            )),
            many => Err(format!(
                "{want:?} matches {} files: {}; name one with --gguf-file",
                many.len(),
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
    }
    if let [one] = whole.as_slice() {
        return Ok(one.to_string());
    }
    for q in GGUF_PREFERENCE {
        if let [one] = by_quant(q).as_slice() {
            return Ok(one.to_string());
        }
    }
    if whole.is_empty() {
        return Err(format!(
            "only split GGUF files, which are not supported: {}",
            names()
        ));
    }
    Err(format!("several .gguf files ({}); choose one with --gguf-file NAME or a quantization such as Q4_K_M", names()))
}

fn is_split_part(name: &str) -> bool {
    let stem = name.trim_end_matches(".gguf");
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    parts.len() == 4
        && parts[1] == "of"
        && parts[0].len() == 5
        && parts[2].len() == 5
        && parts[0]
            .bytes()
            .chain(parts[2].bytes())
            .all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_safetensors_repo_fetches_config_weights_and_tokenizer_only() {
        let files = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "pytorch_model.bin",
            "onnx/model.safetensors",
        ]);
        let plan = plan(&files, None).unwrap();
        assert_eq!(
            plan.files(),
            names(&[
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model.safetensors"
            ])
        );
    }

    #[test]
    fn an_embedding_repo_fetches_its_sentence_transformers_files() {
        let files = names(&[
            "config.json",
            "model.safetensors",
            "modules.json",
            "1_Pooling/config.json",
            "2_Dense/config.json",
            "2_Dense/model.safetensors",
            "2_Dense/pytorch_model.bin",
            "x_Dense/config.json",
            "config_sentence_transformers.json",
        ]);
        let plan = plan(&files, None).unwrap();
        assert_eq!(
            plan.files(),
            names(&[
                "config.json",
                "modules.json",
                "1_Pooling/config.json",
                "config_sentence_transformers.json",
                "2_Dense/config.json",
                "2_Dense/model.safetensors",
                "model.safetensors"
            ])
        );
    }

    #[test]
    fn a_sharded_repo_fetches_its_index_first() {
        let files = names(&["config.json", INDEX, "a.safetensors", "b.safetensors"]);
        let plan = plan(&files, None).unwrap();
        assert_eq!(plan.files(), names(&["config.json", INDEX]));
        let shards = index_shards(
            r#"{"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(shards, names(&["b.safetensors", "a.safetensors"]));
        for bad in [
            r#"{"weight_map": {"x": "../etc/passwd.safetensors"}}"#,
            r#"{"weight_map": {"x": "/abs.safetensors"}}"#,
            r#"{"weight_map": {"x": "a.bin"}}"#,
            r#"{"weight_map": {"x": 3}}"#,
            r#"{"weight_map": {}}"#,
            r#"{"metadata": {}}"#,
            "not json",
        ] {
            assert!(index_shards(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gguf_files_are_chosen_by_name_quantization_or_preference() {
        let files = names(&[
            "m-Q4_K_M.gguf",
            "m-Q8_0.gguf",
            "m-Q4_K_S.gguf",
            "mmproj-m-f16.gguf",
            "big-Q4_0-00001-of-00002.gguf",
            "big-Q4_0-00002-of-00002.gguf",
        ]);
        let file = |g: Option<&str>| match plan(&files, g) {
            Ok(Plan::Gguf { file, .. }) => Ok(file),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(file(None).unwrap(), "m-Q4_K_M.gguf");
        assert_eq!(file(Some("q8_0")).unwrap(), "m-Q8_0.gguf");
        assert_eq!(file(Some("m-Q4_K_S.gguf")).unwrap(), "m-Q4_K_S.gguf");
        assert!(file(Some("Q5_K_M"))
            .unwrap_err()
            .contains("no .gguf file matches"));
        assert!(file(Some("big-Q4_0-00001-of-00002.gguf"))
            .unwrap_err()
            .contains("split"));
        let err = plan(&names(&["README.md"]), None).unwrap_err();
        assert!(err.contains("no config.json"), "{err}");
        let err = plan(&names(&["a-Q2_K.gguf", "b-Q3_K_L.gguf"]), None).unwrap_err();
        assert!(err.contains("--gguf-file"), "{err}");
    }
}
