//! The Hugging Face cache layout, read and written as `huggingface_hub`
//! does: `models--ORG--NAME/refs/REVISION` holds a commit,
//! `snapshots/COMMIT/FILE` links to `blobs/ETAG`.

use std::path::{Path, PathBuf};

use crate::{io_err, HubError};

/// A cache folder (`$HF_HUB_CACHE`).
#[derive(Debug, Clone)]
pub struct HubCache {
    pub root: PathBuf,
}

/// One cached repository, as `lmspec ls` shows it.
#[derive(Debug, Clone)]
pub struct CachedRepo {
    pub repo: String,
    pub folder: PathBuf,
    /// Branch or tag names with the commit each points at.
    pub refs: Vec<(String, String)>,
    /// Snapshot folders (one per cached commit).
    pub snapshots: Vec<PathBuf>,
    /// Bytes of the blobs (each stored once, whatever links to it).
    pub size: u64,
}

impl HubCache {
    pub fn new(root: impl Into<PathBuf>) -> HubCache {
        HubCache { root: root.into() }
    }

    /// `models--ORG--NAME`.
    pub fn repo_folder(&self, repo: &str) -> PathBuf {
        self.root
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The commit a branch, tag or commit name stands for in the cache.
    pub fn commit(&self, repo: &str, revision: &str) -> Option<String> {
        let folder = self.repo_folder(repo);
        if let Ok(commit) = std::fs::read_to_string(folder.join("refs").join(revision)) {
            let commit = commit.trim().to_string();
            return is_commit(&commit).then_some(commit);
        }
        (is_commit(revision) && folder.join("snapshots").join(revision).is_dir())
            .then(|| revision.to_string())
    }

    pub fn snapshot(&self, repo: &str, commit: &str) -> PathBuf {
        self.repo_folder(repo).join("snapshots").join(commit)
    }

    /// Points `revision` at `commit` (not for a commit name itself, which
    /// needs no ref, as in `huggingface_hub`).
    pub fn set_ref(&self, repo: &str, revision: &str, commit: &str) -> Result<(), HubError> {
        if revision == commit {
            return Ok(());
        }
        let path = self.repo_folder(repo).join("refs").join(revision);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::write(&path, commit).map_err(io_err(&path))
    }

    /// Every cached repository, sorted by id.
    pub fn list(&self) -> Result<Vec<CachedRepo>, HubError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(id) = name.strip_prefix("models--") else {
                continue;
            };
            let folder = entry.path();
            let refs = files_under(&folder.join("refs"))
                .into_iter()
                .filter_map(|(rel, path)| {
                    let commit = std::fs::read_to_string(path).ok()?.trim().to_string();
                    Some((rel, commit))
                })
                .collect();
            let mut snapshots: Vec<PathBuf> = std::fs::read_dir(folder.join("snapshots"))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            snapshots.sort();
            let size = files_under(&folder.join("blobs"))
                .iter()
                .filter(|(rel, _)| !rel.ends_with(".lock") && !rel.ends_with(".part"))
                .filter_map(|(_, p)| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum();
            out.push(CachedRepo {
                repo: id.replacen("--", "/", 1),
                folder,
                refs,
                snapshots,
                size,
            });
        }
        out.sort_by(|a, b| a.repo.cmp(&b.repo));
        Ok(out)
    }

    /// Deletes a repository's folder (every revision). False when it was
    /// not cached.
    pub fn remove(&self, repo: &str) -> Result<bool, HubError> {
        let folder = self.repo_folder(repo);
        if !folder.exists() {
            return Ok(false);
        }
        std::fs::remove_dir_all(&folder).map_err(io_err(&folder))?;
        Ok(true)
    }
}

/// A full 40-digit hex commit id.
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Regular files (or links to them) under `dir`, with their paths relative
/// to `dir` using `/`.
pub fn files_under(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), dir.to_path_buf())];
    while let Some((prefix, d)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let path = e.path();
            if path.is_dir() {
                stack.push((rel, path));
            } else if path.is_file() {
                out.push((rel, path));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_and_commits_resolve_and_listing_counts_blobs_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HubCache::new(dir.path());
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(cache.commit("org/m", "main"), None);
        let snap = cache.snapshot("org/m", commit);
        std::fs::create_dir_all(&snap).unwrap();
        assert_eq!(cache.commit("org/m", commit).as_deref(), Some(commit));
        cache.set_ref("org/m", "main", commit).unwrap();
        assert_eq!(cache.commit("org/m", "main").as_deref(), Some(commit));
        let blobs = cache.repo_folder("org/m").join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join("abc"), [0u8; 10]).unwrap();
        std::fs::write(blobs.join("abc.part"), [0u8; 5]).unwrap();
        let listed = cache.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].repo, "org/m");
        assert_eq!(listed[0].size, 10);
        assert_eq!(
            listed[0].refs,
            vec![("main".to_string(), commit.to_string())]
        );
        assert!(cache.remove("org/m").unwrap());
        assert!(!cache.remove("org/m").unwrap());
    }
}
