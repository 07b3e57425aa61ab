//! Known hub ids with the defaults their files do not carry: extra
//! end-of-turn tokens, a default prompt, the tool-call format, reasoning
//! markers (`specs/registry/*.yaml`). Unknown ids load from their own files
//! alone.

use std::path::{Path, PathBuf};

use lmspec_hub::HubId;
use lmspec_spec::library::{parse_yaml, SpecRoot};
use serde::Deserialize;

use crate::tools::ToolFormat;
use lmspec_engine::{Error, Result};

/// Defaults of a known model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelDefaults {
    /// The prompt `lmspec generate` uses when none is given.
    pub default_prompt: Option<String>,
    /// Tokens that also end generation (by their text in the vocabulary).
    pub extra_eos: Vec<String>,
    /// The tool-call format (a name in `specs/tool-formats/`), used unless
    /// one is asked for.
    pub tool_format: Option<String>,
    /// Open and close markers of reasoning.
    pub reasoning: Option<(String, String)>,
    /// The registry file and entry these came from.
    pub source: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    registry_version: u32,
    #[serde(default)]
    models: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    ids: Vec<String>,
    default_prompt: Option<String>,
    #[serde(default)]
    extra_eos: Vec<String>,
    tool_format: Option<String>,
    reasoning: Option<Markers>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Markers {
    start: String,
    end: String,
}

/// Every registry entry of a spec library, by id (case-insensitive).
#[derive(Debug, Clone, Default)]
pub struct Registry {
    entries: Vec<(String, ModelDefaults)>,
}

impl Registry {
    /// The entries of `registry/*.yaml` under `root`; tool formats are
    /// checked against `formats`. Errors name the file, entry and field.
    pub fn load(root: &SpecRoot, formats: &[ToolFormat]) -> Result<Registry> {
        let mut entries: Vec<(String, ModelDefaults)> = Vec::new();
        for path in root.files("registry")? {
            let file: RegistryFile = parse_yaml(&root.read(&path)?, &path)?;
            let err = |node: String, field: &str, msg: String| Error::spec(&path, node, field, msg);
            if file.registry_version != 1 {
                return Err(err(
                    "<document>".into(),
                    "registry_version",
                    format!("{} is not supported (1 is)", file.registry_version),
                ));
            }
            for (i, e) in file.models.into_iter().enumerate() {
                let node = format!("models[{i}]");
                if e.ids.is_empty() {
                    return Err(err(node, "ids", "empty".into()));
                }
                if let Some(f) = e.tool_format.as_deref() {
                    if !formats.iter().any(|k| k.name == f) {
                        let known: Vec<&str> = formats.iter().map(|k| k.name.as_str()).collect();
                        return Err(err(
                            node,
                            "tool_format",
                            format!(
                                "no tool format is named '{f}' (known: {})",
                                known.join(", ")
                            ),
                        ));
                    }
                }
                if e.default_prompt
                    .as_deref()
                    .is_some_and(|p| p.trim().is_empty())
                {
                    return Err(err(node, "default_prompt", "empty".into()));
                }
                if e.extra_eos.iter().any(String::is_empty) {
                    return Err(err(node, "extra_eos", "an empty token".into()));
                }
                if let Some(m) = &e.reasoning {
                    if m.start.is_empty() || m.end.is_empty() {
                        return Err(err(
                            node,
                            "reasoning",
                            "start and end must not be empty".into(),
                        ));
                    }
                }
                let defaults = ModelDefaults {
                    default_prompt: e.default_prompt,
                    extra_eos: e.extra_eos,
                    tool_format: e.tool_format,
                    reasoning: e.reasoning.map(|m| (m.start, m.end)),
                    source: Some(format!("{}: {node}", path.display())),
                };
                for (j, id) in e.ids.iter().enumerate() {
                    let parsed = HubId::parse(id)
                        .map_err(|x| err(node.clone(), &format!("ids[{j}]"), x.to_string()))?;
                    if id.contains('@') {
                        return Err(err(
                            node,
                            &format!("ids[{j}]"),
                            format!("{id:?}: an id without a revision"),
                        ));
                    }
                    let key = parsed.repo.to_ascii_lowercase();
                    if let Some((_, prev)) = entries.iter().find(|(k, _)| *k == key) {
                        return Err(err(
                            node,
                            &format!("ids[{j}]"),
                            format!(
                                "{id} is also listed at {}",
                                prev.source.as_deref().unwrap_or("?")
                            ),
                        ));
                    }
                    entries.push((key, defaults.clone()));
                }
            }
        }
        Ok(Registry { entries })
    }

    /// The defaults of a repository id (any revision).
    pub fn lookup(&self, repo: &str) -> Option<&ModelDefaults> {
        let key = repo.to_ascii_lowercase();
        self.entries.iter().find(|(k, _)| *k == key).map(|(_, d)| d)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The registry folder of a spec folder on disk (for messages).
pub fn registry_dir(specs: &Path) -> PathBuf {
    specs.join("registry")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formats() -> Vec<ToolFormat> {
        ToolFormat::load_all(&SpecRoot::Embedded).expect("built-in tool formats")
    }

    fn load(text: &str) -> Result<Registry> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(registry_dir(dir.path())).expect("mkdir");
        std::fs::write(registry_dir(dir.path()).join("r.yaml"), text).expect("write");
        Registry::load(&SpecRoot::Dir(dir.path().to_path_buf()), &formats())
    }

    #[test]
    fn the_built_in_registry_loads_and_looks_up_ids_case_insensitively() {
        let reg = Registry::load(&SpecRoot::Embedded, &formats()).expect("registry");
        assert!(reg.len() > 40, "{}", reg.len());
        let phi = reg
            .lookup("MLX-community/phi-3.5-mini-instruct-4bit")
            .expect("listed");
        assert_eq!(phi.extra_eos, vec!["<|end|>".to_string()]);
        assert_eq!(
            reg.lookup("mlx-community/GLM-4-9B-0414-4bit")
                .and_then(|d| d.tool_format.as_deref()),
            Some("glm4")
        );
        assert!(reg.lookup("someone/unknown").is_none());
    }

    #[test]
    fn bad_registries_name_the_file_entry_and_field() {
        let cases = [
            ("registry_version: 2\n", "registry_version"),
            (
                "registry_version: 1\nmodels: [{ids: []}]\n",
                "models[0]: ids: empty",
            ),
            (
                "registry_version: 1\nmodels: [{ids: [a/b], tool_format: nope}]\n",
                "models[0]: tool_format: no tool format is named 'nope'",
            ),
            (
                "registry_version: 1\nmodels: [{ids: [a/b]}, {ids: [A/B]}]\n",
                "models[1]: ids[0]: A/B is also listed at",
            ),
            (
                "registry_version: 1\nmodels: [{ids: [not-an-id]}]\n",
                "models[0]: ids[0]",
            ),
            (
                "registry_version: 1\nmodels: [{ids: [a/b@dev]}]\n",
                "an id without a revision",
            ),
            (
                "registry_version: 1\nmodels: [{ids: [a/b], default_prompt: ' '}]\n",
                "default_prompt: empty",
            ),
            (
                "registry_version: 1\nmodels: [{ids: [a/b], extra_eos: ['']}]\n",
                "extra_eos",
            ),
            (
                "registry_version: 1\nmodels: [{ids: [a/b], reasoning: {start: '<t>', end: ''}}]\n",
                "reasoning",
            ),
            (
                "registry_version: 1\nmodels: [{ids: [a/b], colour: red}]\n",
                "colour",
            ),
        ];
        for (text, want) in cases {
            let err = load(text).expect_err(text).to_string();
            assert!(
                err.contains("r.yaml") && err.contains(want),
                "{text}: {err}"
            );
        }
        let ok =
            load("registry_version: 1\nmodels: [{ids: [a/b], extra_eos: ['<e>']}]\n").expect("ok");
        assert_eq!(ok.lookup("a/b").map(|d| d.extra_eos.len()), Some(1));
    }
}
