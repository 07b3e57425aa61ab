//! Finding spec files, parsing them, and resolving `extends` and the shared
//! block library into one [`Spec`] per architecture.
use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use crate::error::{read_to_string, Error, Result};
use crate::raw::{
    BindingDef, RawBinding, RawBlock, RawGguf, RawLayers, RawRule, RawSpec, Task, SPEC_VERSION,
};

/// Something defined in a spec file, with the file it came from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub file: PathBuf,
    pub item: T,
}

impl Spec {
    /// The checkpoint keys the spec's config entries read: each entry's
    /// `from` keys (the top-level key of a dotted path), or its own name;
    /// entries with a `value` or `per_layer` read none.
    pub fn checkpoint_keys(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for (name, def) in &self.config {
            let b = &def.item;
            if b.value.is_some() || b.per_layer.is_some() {
                continue;
            }
            match b.from.as_ref().map(|f| f.to_vec()) {
                Some(keys) if !keys.is_empty() => {
                    for k in keys {
                        out.insert(k.split('.').next().unwrap_or(&k).to_string());
                    }
                }
                _ => {
                    out.insert(name.clone());
                }
            }
        }
        out
    }
}

/// An architecture after `extends` and library blocks are resolved.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub file: PathBuf,
    pub description: Option<String>,
    pub model_types: Vec<String>,
    /// What the output is for (`task:`, not inherited through `extends`).
    pub task: Task,
    pub config: IndexMap<String, Sourced<BindingDef>>,
    pub blocks: IndexMap<String, Sourced<RawBlock>>,
    pub layers: Option<Sourced<RawLayers>>,
    pub model: Sourced<RawBlock>,
    pub rules: Vec<Sourced<RawRule>>,
    pub gguf: Option<Sourced<RawGguf>>,
    pub tool_format: Option<String>,
    /// Keys the spec accepts with one value only (`config_keys.only`).
    pub only_keys: IndexMap<String, Sourced<serde_yaml::Value>>,
    /// Keys the spec knows and ignores, with the reason (`config_keys.ignored`).
    pub ignored_keys: IndexMap<String, Sourced<String>>,
    /// Tensor parallelism (`parallel:`, not inherited through `extends`).
    pub parallel: Option<Sourced<crate::raw::RawParallel>>,
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

/// Longest `extends` chain: a spec and the parents it extends.
pub const MAX_EXTENDS: usize = 16;

/// Deepest nesting of YAML flow collections (`[...]`, `{...}`) a file may
/// have; deeper input is refused before the YAML parser sees it.
pub const MAX_YAML_NESTING: usize = 64;

/// The line of the first place `text` nests flow collections deeper than
/// `max`, skipping quoted text and comments.
fn too_deep(text: &str, max: usize) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    let mut prev = '\n';
    while let Some(c) = chars.next() {
        match (quote, c) {
            (_, '\n') => {
                line += 1;
                if quote == Some('#') {
                    quote = None;
                }
            }
            (Some('"'), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q && q != '#' => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') if prev.is_whitespace() => quote = Some('#'),
            (None, '[' | '{') => {
                depth += 1;
                if depth > max {
                    return Some(line);
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    None
}

/// Parses a YAML file of ours (a spec, a tool format) into `T`, refusing
/// input nested deeper than [`MAX_YAML_NESTING`].
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    if let Some(line) = too_deep(text, MAX_YAML_NESTING) {
        return Err(Error::spec(
            path,
            format!("line {line}"),
            "yaml",
            format!("nested more than {MAX_YAML_NESTING} levels deep"),
        ));
    }
    serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))
}

pub fn parse_str(text: &str, path: &Path) -> Result<RawSpec> {
    let raw: RawSpec = parse_yaml(text, path)?;
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

/// Where spec files come from: a folder on disk, or the copy of the
/// repository's `specs/` built into the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecRoot {
    Dir(PathBuf),
    Embedded,
}

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_specs.rs"));
}

/// The prefix embedded spec files are named under (in errors too).
const EMBEDDED_PREFIX: &str = "specs";

impl SpecRoot {
    /// `$LMSPEC_SPECS` when set, else the built-in copy.
    pub fn from_env() -> SpecRoot {
        match std::env::var_os("LMSPEC_SPECS") {
            Some(p) => SpecRoot::Dir(PathBuf::from(p)),
            None => SpecRoot::Embedded,
        }
    }

    /// The YAML files of a subfolder (`models`, `blocks`, `tool-formats`),
    /// sorted by name.
    pub fn files(&self, sub: &str) -> Result<Vec<PathBuf>> {
        match self {
            SpecRoot::Dir(root) => yaml_files(&root.join(sub)),
            SpecRoot::Embedded => {
                let prefix = format!("{sub}/");
                Ok(embedded::EMBEDDED
                    .iter()
                    .filter(|(p, _)| p.strip_prefix(&prefix).is_some_and(|f| !f.contains('/')))
                    .map(|(p, _)| Path::new(EMBEDDED_PREFIX).join(p))
                    .collect())
            }
        }
    }

    /// The text of a spec file: an embedded one by its name, else from disk.
    pub fn read(&self, path: &Path) -> Result<String> {
        if *self == SpecRoot::Embedded {
            if let Ok(rel) = path.strip_prefix(EMBEDDED_PREFIX) {
                let rel = rel.to_string_lossy();
                if let Some((_, text)) = embedded::EMBEDDED.iter().find(|(p, _)| *p == rel) {
                    return Ok(text.to_string());
                }
            }
        }
        read_to_string(path)
    }
}

impl std::fmt::Display for SpecRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpecRoot::Dir(p) => write!(f, "{}", p.display()),
            SpecRoot::Embedded => write!(f, "built-in ({} files)", embedded::EMBEDDED.len()),
        }
    }
}

/// The spec folder: architectures under `models/`, shared blocks (and the
/// config entries they own) under `blocks/`, tool-call formats under
/// `tool-formats/`.
#[derive(Debug, Clone)]
pub struct SpecLibrary {
    pub root: SpecRoot,
    models: IndexMap<String, (PathBuf, RawSpec)>,
    blocks: IndexMap<String, Sourced<RawBlock>>,
    /// Config entries declared by block library files, by file.
    block_config: IndexMap<PathBuf, IndexMap<String, BindingDef>>,
}

impl SpecLibrary {
    /// `$LMSPEC_SPECS` when set, else the built-in library.
    pub fn open_default() -> Result<SpecLibrary> {
        SpecLibrary::from_root(SpecRoot::from_env())
    }

    /// The library built into the binary.
    pub fn embedded() -> Result<SpecLibrary> {
        SpecLibrary::from_root(SpecRoot::Embedded)
    }

    /// A spec folder on disk.
    pub fn open(root: &Path) -> Result<SpecLibrary> {
        SpecLibrary::from_root(SpecRoot::Dir(root.to_path_buf()))
    }

    /// The library at `root`: its blocks and models, parsed.
    pub fn from_root(root: SpecRoot) -> Result<SpecLibrary> {
        if let SpecRoot::Dir(dir) = &root {
            if !dir.is_dir() {
                return Err(Error::Io {
                    path: dir.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "the spec folder does not exist",
                    ),
                });
            }
        }
        let mut blocks = IndexMap::new();
        let mut block_config = IndexMap::new();
        for path in root.files("blocks")? {
            let raw = parse_str(&root.read(&path)?, &path)?;
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
            let config: IndexMap<String, BindingDef> = raw
                .config
                .iter()
                .map(|(k, b)| (k.clone(), binding_def(b)))
                .collect();
            block_config.insert(path.clone(), config);
        }
        let mut models = IndexMap::new();
        for path in root.files("models")? {
            let raw = parse_str(&root.read(&path)?, &path)?;
            let name = spec_name(&raw, &path);
            for mt in &raw.model_types {
                if let Some((other, _)) =
                    models
                        .iter()
                        .find(|(_, (_, r)): &(&String, &(PathBuf, RawSpec))| {
                            r.model_types.contains(mt)
                                && r.task.unwrap_or_default() == raw.task.unwrap_or_default()
                        })
                {
                    return Err(Error::spec(
                        &path,
                        "<document>",
                        "model_types",
                        format!(
                            "model_type '{mt}' is already claimed by spec '{other}' for task '{}'",
                            raw.task.unwrap_or_default().name()
                        ),
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
            root,
            models,
            blocks,
            block_config,
        })
    }

    /// Where the library's files come from.
    pub fn root(&self) -> &SpecRoot {
        &self.root
    }

    /// Names of the architecture specs, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Every `model_type` some spec claims, once, with the spec's name:
    /// the `generate` spec where there is one, else the first other claim.
    pub fn model_types(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for pass_generate in [true, false] {
            for (name, (_, raw)) in &self.models {
                if (raw.task.unwrap_or_default() == Task::Generate) != pass_generate {
                    continue;
                }
                for mt in &raw.model_types {
                    if !out.iter().any(|(m, _)| m == mt) {
                        out.push((mt.clone(), name.clone()));
                    }
                }
            }
        }
        out
    }

    /// Loads a spec by name, or by path to a YAML file.
    pub fn load(&self, name_or_path: &str) -> Result<Spec> {
        if let Some((path, raw)) = self.models.get(name_or_path) {
            let spec = self.resolve(path, raw.clone(), &mut Vec::new())?;
            return Ok(self.with_block_config(spec));
        }
        let path = Path::new(name_or_path);
        if path.exists() {
            return self.load_text(&read_to_string(path)?, path);
        }
        Err(Error::Usage(format!(
            "no spec named '{name_or_path}' (known: {})",
            self.models.keys().cloned().collect::<Vec<_>>().join(", ")
        )))
    }

    /// A spec from its text (`path` names it in errors and anchors a
    /// relative `extends`), resolved against this library.
    pub fn load_text(&self, text: &str, path: &Path) -> Result<Spec> {
        let raw = parse_str(text, path)?;
        let spec = self.resolve(path, raw, &mut Vec::new())?;
        Ok(self.with_block_config(spec))
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

    /// Whether a spec of `task` itself claims `model_type` (no fallback to
    /// the other tasks' claims): a vision-language checkpoint has a tower
    /// when a `vision` spec claims its type.
    pub fn claims_for_task(&self, model_type: &str, task: Task) -> bool {
        self.models.values().any(|(_, raw)| {
            raw.task.unwrap_or_default() == task && raw.model_types.iter().any(|m| m == model_type)
        })
    }

    /// The spec claiming `model_type`; `config_file` is named in the error.
    /// A `generate` spec is preferred when several tasks claim it.
    pub fn for_model_type(&self, model_type: &str, config_file: &Path) -> Result<Spec> {
        self.for_model_type_task(model_type, Task::Generate, config_file)
    }

    /// The spec claiming `model_type` for `task`, else any spec claiming it
    /// (the `generate` one first); `config_file` is named in the error.
    pub fn for_model_type_task(
        &self,
        model_type: &str,
        task: Task,
        config_file: &Path,
    ) -> Result<Spec> {
        let claims = |raw: &RawSpec| raw.model_types.iter().any(|m| m == model_type);
        for (name, (_, raw)) in &self.models {
            if claims(raw) && raw.task.unwrap_or_default() == task {
                return self.load(name);
            }
        }
        if let Some((name, _)) = self
            .model_types()
            .into_iter()
            .find(|(m, _)| m == model_type)
        {
            return self.load(&name);
        }
        let mut known: Vec<String> = self.model_types().into_iter().map(|(m, _)| m).collect();
        known.sort();
        Err(Error::UnknownModelType {
            file: config_file.to_path_buf(),
            model_type: model_type.to_string(),
            known,
        })
    }

    /// Adds the config entries that the library files of the blocks `spec`
    /// runs declare, where the spec does not declare them itself (library <
    /// parent < child).
    fn with_block_config(&self, mut spec: Spec) -> Spec {
        let used = crate::check::reachable_blocks(&spec);
        let mut files: Vec<&PathBuf> = Vec::new();
        for (name, block) in &spec.blocks {
            if used.contains(name.as_str()) && !files.contains(&&block.file) {
                files.push(&block.file);
            }
        }
        let mut owned: IndexMap<String, Sourced<BindingDef>> = IndexMap::new();
        for file in files {
            for (name, def) in self.block_config.get(file).into_iter().flatten() {
                if !spec.config.contains_key(name) && !owned.contains_key(name) {
                    owned.insert(
                        name.clone(),
                        Sourced {
                            file: file.clone(),
                            item: def.clone(),
                        },
                    );
                }
            }
        }
        owned.extend(spec.config);
        spec.config = owned;
        spec
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
        if seen.len() >= MAX_EXTENDS {
            return Err(Error::spec(
                path,
                "<document>",
                "extends",
                format!("the extends chain is longer than {MAX_EXTENDS} files"),
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
                        let text = match self.root.read(&p) {
                            Err(Error::Io { source, .. }) => {
                                let shown: String = parent.chars().take(80).collect();
                                let why = match source.kind() {
                                    std::io::ErrorKind::NotFound => "no spec has this name".into(),
                                    _ => source.to_string(),
                                };
                                return Err(Error::spec(
                                    path,
                                    "<document>",
                                    "extends",
                                    format!("'{shown}': {why}"),
                                ));
                            }
                            other => other?,
                        };
                        let r = parse_str(&text, &p)?;
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
                task: Task::Generate,
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
                only_keys: IndexMap::new(),
                ignored_keys: IndexMap::new(),
                parallel: None,
            },
        };
        spec.name = name;
        spec.file = path.to_path_buf();
        spec.description = raw.description.or(spec.description);
        spec.model_types = raw.model_types;
        spec.task = raw.task.unwrap_or_default();
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
        // Not inherited: a spec that extends another runs its own nodes,
        // whose sharding its own tests must show.
        spec.parallel = raw.parallel.map(|p| sourced(path, p));
        for (k, v) in raw.config_keys.only {
            spec.ignored_keys.shift_remove(&k);
            spec.only_keys.insert(k, sourced(path, v));
        }
        for (k, why) in raw.config_keys.ignored {
            spec.only_keys.shift_remove(&k);
            spec.ignored_keys.insert(k, sourced(path, why));
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
