//! Finding spec files, parsing them, and resolving `extends` and the shared
//! block library into one [`Spec`] per architecture.
use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use super::raw::{
    BindingDef, RawBinding, RawBlock, RawGguf, RawLayers, RawRule, RawSpec, SPEC_VERSION,
};
use crate::error::{read_to_string, Error, Result};

/// Something defined in a spec file, with the file it came from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub file: PathBuf,
    pub item: T,
}

/// An architecture after `extends` and library blocks are resolved.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub file: PathBuf,
    pub description: Option<String>,
    pub model_types: Vec<String>,
    pub config: IndexMap<String, Sourced<BindingDef>>,
    pub blocks: IndexMap<String, Sourced<RawBlock>>,
    pub layers: Option<Sourced<RawLayers>>,
    pub model: Sourced<RawBlock>,
    pub rules: Vec<Sourced<RawRule>>,
    pub gguf: Option<Sourced<RawGguf>>,
    pub tool_format: Option<String>,
}

/// Parses one spec file, naming the file and position on error.
pub fn parse_file(path: &Path) -> Result<RawSpec> {
    let text = read_to_string(path)?;
    parse_str(&text, path)
}

/// A YAML syntax or shape error in `path`, located by line and column.
pub fn yaml_error(path: &Path, e: &serde_yaml::Error) -> Error {
    let node = match e.location() {
        Some(l) => format!("line {}, column {}", l.line(), l.column()),
        None => "<document>".to_string(),
    };
    Error::spec(path, node, "yaml", e.to_string())
}

pub fn parse_str(text: &str, path: &Path) -> Result<RawSpec> {
    let raw: RawSpec = serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?;
    if raw.spec_version != SPEC_VERSION {
        return Err(Error::spec(
            path,
            "<document>",
            "spec_version",
            format!(
                "version {} is not supported (this engine reads {SPEC_VERSION})",
                raw.spec_version
            ),
        ));
    }
    Ok(raw)
}

fn binding_def(b: &RawBinding) -> BindingDef {
    match b {
        RawBinding::Type(ty) => BindingDef {
            ty: ty.clone(),
            from: None,
            default: None,
            value: None,
            optional: false,
            per_layer: None,
            doc: None,
        },
        RawBinding::Full(def) => (**def).clone(),
    }
}

/// The spec folder: architectures under `models/`, shared blocks under `blocks/`.
#[derive(Debug, Clone)]
pub struct SpecLibrary {
    pub root: PathBuf,
    models: IndexMap<String, (PathBuf, RawSpec)>,
    blocks: IndexMap<String, Sourced<RawBlock>>,
}

impl SpecLibrary {
    /// The spec folder used when none is given: `$LMSPEC_SPECS`, else the
    /// `specs/` folder of this source tree.
    pub fn default_root() -> PathBuf {
        match std::env::var_os("LMSPEC_SPECS") {
            Some(p) => PathBuf::from(p),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs"),
        }
    }

    pub fn open_default() -> Result<SpecLibrary> {
        SpecLibrary::open(&SpecLibrary::default_root())
    }

    pub fn open(root: &Path) -> Result<SpecLibrary> {
        let mut blocks = IndexMap::new();
        for path in yaml_files(&root.join("blocks"))? {
            let raw = parse_file(&path)?;
            for (name, block) in raw.blocks {
                if let Some(prev) = blocks.get(&name) {
                    let prev: &Sourced<RawBlock> = prev;
                    return Err(Error::spec(
                        &path,
                        format!("blocks.{name}"),
                        "name",
                        format!("block also defined in {}", prev.file.display()),
                    ));
                }
                blocks.insert(
                    name,
                    Sourced {
                        file: path.clone(),
                        item: block,
                    },
                );
            }
        }
        let mut models = IndexMap::new();
        for path in yaml_files(&root.join("models"))? {
            let raw = parse_file(&path)?;
            let name = spec_name(&raw, &path);
            for mt in &raw.model_types {
                if let Some((other, _)) = models
                    .iter()
                    .find(|(_, (_, r)): &(&String, &(PathBuf, RawSpec))| r.model_types.contains(mt))
                {
                    return Err(Error::spec(
                        &path,
                        "<document>",
                        "model_types",
                        format!("model_type '{mt}' is already claimed by spec '{other}'"),
                    ));
                }
            }
            if let Some((other, _)) = models.get(&name) {
                return Err(Error::spec(
                    &path,
                    "<document>",
                    "name",
                    format!("spec name '{name}' is already used by {}", other.display()),
                ));
            }
            models.insert(name, (path, raw));
        }
        Ok(SpecLibrary {
            root: root.to_path_buf(),
            models,
            blocks,
        })
    }

    /// Names of the architecture specs, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Every `model_type` some spec claims, with the spec's name.
    pub fn model_types(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, (_, raw)) in &self.models {
            for mt in &raw.model_types {
                out.push((mt.clone(), name.clone()));
            }
        }
        out
    }

    /// Loads a spec by name, or by path to a YAML file.
    pub fn load(&self, name_or_path: &str) -> Result<Spec> {
        if let Some((path, raw)) = self.models.get(name_or_path) {
            return self.resolve(path, raw.clone(), &mut Vec::new());
        }
        let path = Path::new(name_or_path);
        if path.exists() {
            let raw = parse_file(path)?;
            return self.resolve(path, raw, &mut Vec::new());
        }
        Err(Error::Usage(format!(
            "no spec named '{name_or_path}' (known: {})",
            self.models.keys().cloned().collect::<Vec<_>>().join(", ")
        )))
    }

    /// The spec serving GGUF files of `arch` (`general.architecture`).
    pub fn for_gguf_architecture(&self, arch: &str, file: &Path) -> Result<Spec> {
        for (name, (_, raw)) in &self.models {
            if raw
                .gguf
                .as_ref()
                .is_some_and(|g| g.architectures.iter().any(|a| a == arch))
            {
                return self.load(name);
            }
        }
        let known: Vec<String> = self
            .models
            .values()
            .filter_map(|(_, r)| r.gguf.as_ref())
            .flat_map(|g| g.architectures.clone())
            .collect();
        Err(Error::Weights {
            file: file.to_path_buf(),
            msg: format!(
                "GGUF architecture '{arch}' is not served by any spec (known: {})",
                known.join(", ")
            ),
        })
    }

    /// The spec claiming `model_type`; `config_file` is named in the error.
    pub fn for_model_type(&self, model_type: &str, config_file: &Path) -> Result<Spec> {
        for (name, (_, raw)) in &self.models {
            if raw.model_types.iter().any(|m| m == model_type) {
                return self.load(name);
            }
        }
        let mut known: Vec<String> = self.model_types().into_iter().map(|(m, _)| m).collect();
        known.sort();
        Err(Error::UnknownModelType {
            file: config_file.to_path_buf(),
            model_type: model_type.to_string(),
            known,
        })
    }

    fn resolve(&self, path: &Path, raw: RawSpec, seen: &mut Vec<PathBuf>) -> Result<Spec> {
        if seen.iter().any(|p| p == path) {
            return Err(Error::spec(
                path,
                "<document>",
                "extends",
                "extends chain loops back to this file",
            ));
        }
        seen.push(path.to_path_buf());
        let name = spec_name(&raw, path);
        fn sourced<T>(path: &Path, item: T) -> Sourced<T> {
            Sourced {
                file: path.to_path_buf(),
                item,
            }
        }
        let mut spec = match &raw.extends {
            Some(parent) => {
                let (ppath, praw) = match self.models.get(parent) {
                    Some((p, r)) => (p.clone(), r.clone()),
                    None => {
                        let p = path.parent().unwrap_or(Path::new(".")).join(parent);
                        if !p.exists() {
                            return Err(Error::spec(
                                path,
                                "<document>",
                                "extends",
                                format!("no spec named '{parent}'"),
                            ));
                        }
                        let r = parse_file(&p)?;
                        (p, r)
                    }
                };
                self.resolve(&ppath, praw, seen)?
            }
            None => Spec {
                name: name.clone(),
                file: path.to_path_buf(),
                description: None,
                model_types: Vec::new(),
                config: IndexMap::new(),
                blocks: self.blocks.clone(),
                layers: None,
                model: Sourced {
                    file: path.to_path_buf(),
                    item: RawBlock {
                        inputs: Vec::new(),
                        nodes: IndexMap::new(),
                        output: String::new(),
                    },
                },
                rules: Vec::new(),
                gguf: None,
                tool_format: None,
            },
        };
        spec.name = name;
        spec.file = path.to_path_buf();
        spec.description = raw.description.or(spec.description);
        spec.model_types = raw.model_types;
        for (k, b) in &raw.config {
            spec.config.insert(k.clone(), sourced(path, binding_def(b)));
        }
        for (k, b) in raw.blocks {
            spec.blocks.insert(k, sourced(path, b));
        }
        if let Some(l) = raw.layers {
            spec.layers = Some(sourced(path, l));
        }
        if let Some(m) = raw.model {
            spec.model = sourced(path, m);
        }
        if let Some(g) = raw.gguf {
            spec.gguf = Some(sourced(path, g));
        }
        if raw.tool_format.is_some() {
            spec.tool_format = raw.tool_format;
        }
        // The child's rules run first: they bring a checkpoint to the
        // parent's naming, whose rules (ties, drops) then apply.
        let inherited = std::mem::take(&mut spec.rules);
        spec.rules = raw
            .weights
            .rules
            .into_iter()
            .map(|r| sourced(path, r))
            .chain(inherited)
            .collect();
        if spec.model.item.nodes.is_empty() {
            return Err(Error::spec(
                path,
                "model",
                "nodes",
                "an architecture spec needs a `model` block (directly or through `extends`)",
            ));
        }
        Ok(spec)
    }
}

fn spec_name(raw: &RawSpec, path: &Path) -> String {
    raw.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    })
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}
