//! Models by hub id: `ORG/NAME[@REVISION]` resolved to local files.
//!
//! A [`ModelSource`] is a local path or a hub id. [`resolve`] turns an id
//! into a folder (or one `.gguf` file) in the standard Hugging Face cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`:
//! `models--ORG--NAME/{blobs,refs,snapshots}`, the layout Python's
//! `huggingface_hub` writes, so a model fetched by either is found by the
//! other). Only the files a model needs are fetched ([`select`]); every
//! download is checked against the hub's size and hash before it is used
//! ([`fetch`]); a cached snapshot that has every needed file is used without
//! any request, and `HF_HUB_OFFLINE=1` never makes one.
//!
//! ```no_run
//! use lmspec_hub::{resolve, HubOptions, ModelSource};
//! let source = ModelSource::parse("mlx-community/SmolLM2-135M-Instruct-4bit");
//! let path = resolve(&source, &HubOptions::from_env()).unwrap();
//! println!("model files in {}", path.display());
//! ```

pub mod cache;
mod fetch;
pub mod progress;
pub mod select;

use std::path::{Path, PathBuf};

pub use cache::{CachedRepo, HubCache};
pub use progress::ProgressMode;

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local model folder or `.gguf` file.
    Path(PathBuf),
    /// A hub repository at a branch, tag or commit.
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// An existing path is a path; `ORG/NAME` or `ORG/NAME@REVISION` that
    /// is not one is a hub id; anything else is a path (which then fails to
    /// load with the path in the error).
    pub fn parse(text: &str) -> ModelSource {
        if Path::new(text).exists() {
            return ModelSource::Path(text.into());
        }
        match HubId::parse(text) {
            Ok(id) => ModelSource::Hub {
                repo: id.repo,
                revision: id.revision,
            },
            Err(_) => ModelSource::Path(text.into()),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Path(p) => write!(f, "{}", p.display()),
            ModelSource::Hub { repo, revision } if revision == DEFAULT_REVISION => {
                write!(f, "{repo}")
            }
            ModelSource::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

/// The branch a bare id means.
pub const DEFAULT_REVISION: &str = "main";

/// A parsed hub id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl HubId {
    /// `ORG/NAME[@REVISION]`: names of letters, digits, `-`, `_` and `.`
    /// (not starting with `.` or `-`), revisions of the same plus `/`
    /// without `..`.
    pub fn parse(text: &str) -> Result<HubId, HubError> {
        let bad = |why: &str| HubError::BadId {
            id: text.to_string(),
            why: why.to_string(),
        };
        let (repo, revision) = match text.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (text, DEFAULT_REVISION),
        };
        let Some((org, name)) = repo.split_once('/') else {
            return Err(bad("expected ORG/NAME"));
        };
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 96
                && !s.starts_with(['.', '-'])
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !name_ok(org) || !name_ok(name) {
            return Err(bad(
                "ORG and NAME are letters, digits, '-', '_' and '.' (not leading)",
            ));
        }
        let rev_ok = !revision.is_empty()
            && revision.len() <= 256
            && !revision.contains("..")
            && !revision.starts_with('/')
            && !revision.ends_with('/')
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !rev_ok {
            return Err(bad("REVISION is a branch, tag or commit name"));
        }
        Ok(HubId {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// How to reach the hub and where the cache is.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// `$HF_ENDPOINT`, else `https://huggingface.co`.
    pub endpoint: String,
    /// The cache folder (`models--*` live here).
    pub cache: PathBuf,
    /// `$HF_TOKEN`, else the token file `huggingface_hub` writes.
    pub token: Option<String>,
    /// `$HF_HUB_OFFLINE`: the cache only, never a request.
    pub offline: bool,
    /// For GGUF repositories: a file name, or a quantization name such as
    /// `Q4_K_M` matched against the file names.
    pub gguf_file: Option<String>,
    pub progress: ProgressMode,
}

impl HubOptions {
    /// The settings `huggingface_hub` reads from the environment.
    pub fn from_env() -> HubOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let file = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| home.join("token"));
                std::fs::read_to_string(file)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        HubOptions {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| "https://huggingface.co".into()),
            cache,
            token,
            offline,
            gguf_file: None,
            progress: ProgressMode::Auto,
        }
    }
}

/// A model source as a local path: a path as given; a hub id as its cached
/// snapshot folder, or the chosen `.gguf` file in it, fetched first when
/// the cache lacks a file the model needs.
pub fn resolve(source: &ModelSource, opts: &HubOptions) -> Result<PathBuf, HubError> {
    match source {
        ModelSource::Path(p) => Ok(p.clone()),
        ModelSource::Hub { repo, revision } => fetch::resolve(repo, revision, opts, false),
    }
}

/// Like [`resolve`] for a hub id, but always asks the hub (unless offline)
/// and re-checks every cached file's size and hash, fetching again any that
/// fails: `lmspec pull`.
pub fn pull(repo: &str, revision: &str, opts: &HubOptions) -> Result<PathBuf, HubError> {
    fetch::resolve(repo, revision, opts, true)
}

/// Errors name the repository (and file) they concern.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{id:?} is not a hub id: {why}")]
    BadId { id: String, why: String },
    #[error("{repo}: not found on {endpoint} (HTTP 404){hint}")]
    NotFound {
        repo: String,
        endpoint: String,
        hint: String,
    },
    #[error("{repo}: {what} needs access (HTTP {status}): {advice}")]
    Denied {
        repo: String,
        what: String,
        status: u16,
        advice: String,
    },
    #[error("{repo}: {detail}")]
    NoModel { repo: String, detail: String },
    #[error(
        "{repo}@{revision}: HF_HUB_OFFLINE is set and the cache at {cache} lacks {}",
        missing.join(", ")
    )]
    Offline {
        repo: String,
        revision: String,
        cache: PathBuf,
        missing: Vec<String>,
    },
    #[error("{repo}: {what}: {detail}")]
    Network {
        repo: String,
        what: String,
        detail: String,
    },
    #[error("{repo}: {file}: {detail}; the file was removed from the cache")]
    Corrupt {
        repo: String,
        file: String,
        detail: String,
    },
    #[error("{repo}: {file}: {detail}")]
    BadFile {
        repo: String,
        file: String,
        detail: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_with_and_without_revisions() {
        let id = HubId::parse("mlx-community/Qwen3-4B-4bit").unwrap();
        assert_eq!(id.repo, "mlx-community/Qwen3-4B-4bit");
        assert_eq!(id.revision, "main");
        let id = HubId::parse("org/name.v2@refs/pr/1").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("org/name.v2", "refs/pr/1")
        );
        for bad in [
            "noslash",
            "a/b/c",
            "../x",
            "org/..",
            "org/.hidden",
            "org/na me",
            "org/name@",
            "org/name@../../etc",
            "org/name@/abs",
            "/abs/path",
            "org/",
        ] {
            assert!(HubId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn existing_paths_stay_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("org");
        std::fs::create_dir_all(p.join("name")).unwrap();
        let text = p.join("name").display().to_string();
        assert_eq!(
            ModelSource::parse(&text),
            ModelSource::Path(text.clone().into())
        );
        assert!(matches!(
            ModelSource::parse("org-that-is-not-here/name"),
            ModelSource::Hub { .. }
        ));
        assert!(matches!(
            ModelSource::parse("not an id"),
            ModelSource::Path(_)
        ));
    }
}
