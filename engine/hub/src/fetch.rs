//! Resolving a hub id: the cache first, then the hub through hf-hub, every
//! download checked against the hub's size and hash.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use lmspec_formats::guard::catch_quietly;
use serde::Deserialize;
use sha2::Digest;

use crate::cache::{files_under, is_commit, HubCache};
use crate::progress::Reporter;
use crate::select::{self, Plan};
use crate::{io_err, HubError, HubId, HubOptions, DEFAULT_REVISION};

/// How often hf-hub retries (resuming) a download that broke off.
const RETRIES: usize = 3;
/// The largest repository listing read from the hub.
const MAX_LISTING_BYTES: u64 = 64 << 20;

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: Option<String>,
    size: Option<u64>,
}

impl Sibling {
    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().and_then(|l| l.size).or(self.size)
    }
}

pub(crate) fn resolve(
    repo: &str,
    revision: &str,
    opts: &HubOptions,
    recheck: bool,
) -> Result<PathBuf, HubError> {
    HubId::parse(&format!("{repo}@{revision}"))?;
    let cache = HubCache::new(&opts.cache);
    let cached = cache.commit(repo, revision).map(|commit| {
        let snap = cache.snapshot(repo, &commit);
        cached_target(&snap, opts.gguf_file.as_deref())
    });
    match cached {
        Some(Ok(path)) if !recheck || opts.offline => return Ok(path),
        _ if opts.offline => {
            let missing = match cached {
                Some(Err(why)) => vec![why],
                _ => vec![format!(
                    "the revision (no {} in {})",
                    Path::new("refs").join(revision).display(),
                    cache.repo_folder(repo).display()
                )],
            };
            return Err(HubError::Offline {
                repo: repo.into(),
                revision: revision.into(),
                cache: opts.cache.clone(),
                missing,
            });
        }
        _ => {}
    }
    online(repo, revision, opts, &cache, recheck)
}

/// The model path inside a cached snapshot, or what it lacks.
fn cached_target(snap: &Path, gguf: Option<&str>) -> Result<PathBuf, String> {
    let files: Vec<String> = files_under(snap).into_iter().map(|(rel, _)| rel).collect();
    if files.is_empty() {
        return Err(format!("{} (empty or missing)", snap.display()));
    }
    match select::plan(&files, gguf)? {
        Plan::Gguf { file, .. } => Ok(snap.join(file)),
        Plan::Safetensors { index: None, .. } => Ok(snap.to_path_buf()),
        Plan::Safetensors {
            index: Some(index), ..
        } => {
            let text =
                std::fs::read_to_string(snap.join(&index)).map_err(|e| format!("{index}: {e}"))?;
            let missing: Vec<String> = select::index_shards(&text)
                .map_err(|e| format!("{index}: {e}"))?
                .into_iter()
                .filter(|s| !snap.join(s).is_file())
                .collect();
            if missing.is_empty() {
                Ok(snap.to_path_buf())
            } else {
                Err(missing.join(", "))
            }
        }
    }
}

fn online(
    repo: &str,
    revision: &str,
    opts: &HubOptions,
    cache: &HubCache,
    recheck: bool,
) -> Result<PathBuf, HubError> {
    let ctx = Ctx {
        repo,
        revision,
        opts,
    };
    let api = ApiBuilder::from_cache(Cache::new(opts.cache.clone()))
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(false)
        .with_retries(RETRIES)
        .with_user_agent("lmspec", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| ctx.api_error("setting up the client", e))?;
    let handle = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let info = ctx.listing(&handle)?;
    let commit = info.sha.clone().unwrap_or_default();
    if !is_commit(&commit) {
        return Err(ctx.bad(
            "the repository listing",
            "it has no 40-digit commit id (sha)",
        ));
    }
    let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let plan =
        select::plan(&names, opts.gguf_file.as_deref()).map_err(|detail| HubError::NoModel {
            repo: repo.into(),
            detail,
        })?;
    let snap = cache.snapshot(repo, &commit);
    let start = Instant::now();
    let mut fetched = (0usize, 0u64);
    let mut files = plan.files();
    if let Plan::Safetensors {
        index: Some(index), ..
    } = &plan
    {
        let quiet = Reporter::new(crate::ProgressMode::Quiet, repo, 1, 0);
        let path = ctx.ensure(&handle, &info, &snap, index, &quiet, recheck, &mut fetched)?;
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let shards = select::index_shards(&text).map_err(|d| ctx.bad(index, &d))?;
        if let Some(absent) = shards.iter().find(|s| !names.contains(s)) {
            return Err(ctx.bad(
                index,
                &format!("names {absent}, which the repository lacks"),
            ));
        }
        files.retain(|f| f != index);
        files.extend(shards);
    }
    let todo: Vec<&String> = files
        .iter()
        .filter(|f| recheck || !snap.join(f).is_file())
        .collect();
    let total: u64 = todo
        .iter()
        .filter_map(|f| sibling(&info, f).and_then(Sibling::size))
        .sum();
    let label = ModelLabel(repo, revision).to_string();
    let reporter =
        (!todo.is_empty()).then(|| Reporter::new(opts.progress, &label, todo.len(), total));
    for f in &todo {
        let reporter = reporter.as_ref().expect("created when there is work");
        ctx.ensure(&handle, &info, &snap, f, reporter, recheck, &mut fetched)?;
    }
    if let Some(r) = &reporter {
        r.finish(fetched.0, fetched.1, start.elapsed());
    }
    cache.set_ref(repo, revision, &commit)?;
    Ok(match plan {
        Plan::Gguf { file, .. } => snap.join(file),
        Plan::Safetensors { .. } => snap,
    })
}

fn sibling<'a>(info: &'a RepoInfo, file: &str) -> Option<&'a Sibling> {
    info.siblings.iter().find(|s| s.rfilename == file)
}

struct ModelLabel<'a>(&'a str, &'a str);

impl std::fmt::Display for ModelLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.1 == DEFAULT_REVISION {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}@{}", self.0, self.1)
        }
    }
}

struct Ctx<'a> {
    repo: &'a str,
    revision: &'a str,
    opts: &'a HubOptions,
}

impl Ctx<'_> {
    fn bad(&self, file: &str, detail: &str) -> HubError {
        HubError::BadFile {
            repo: self.repo.into(),
            file: file.into(),
            detail: detail.into(),
        }
    }

    fn network(&self, what: &str, detail: String) -> HubError {
        HubError::Network {
            repo: self.repo.into(),
            what: what.into(),
            detail,
        }
    }

    /// The repository's files with sizes and hashes (`?blobs=true`).
    fn listing(&self, handle: &ApiRepo) -> Result<RepoInfo, HubError> {
        let what = "listing the repository";
        let response = catch_quietly(|| {
            handle
                .info_request()
                .query("blobs", "true")
                .call()
                .map_err(Box::new)
        })
        .map_err(|why| self.network(what, format!("the HTTP client failed ({why})")))?
        .map_err(|e| self.http_error(what, &e))?;
        let mut body = String::new();
        response
            .into_reader()
            .take(MAX_LISTING_BYTES)
            .read_to_string(&mut body)
            .map_err(|e| self.network(what, e.to_string()))?;
        let info: RepoInfo = serde_json::from_str(&body)
            .map_err(|e| self.bad("the repository listing", &format!("invalid JSON: {e}")))?;
        if let Some(s) = info.siblings.iter().find(|s| !safe_name(&s.rfilename)) {
            return Err(self.bad(
                "the repository listing",
                &format!("{:?} is not a file name inside the repository", s.rfilename),
            ));
        }
        Ok(info)
    }

    /// `file` in the snapshot: kept when present (and, with `recheck`,
    /// matching the hub's size and hash), fetched otherwise, then checked.
    #[allow(clippy::too_many_arguments)]
    fn ensure(
        &self,
        handle: &ApiRepo,
        info: &RepoInfo,
        snap: &Path,
        file: &str,
        reporter: &Reporter,
        recheck: bool,
        fetched: &mut (usize, u64),
    ) -> Result<PathBuf, HubError> {
        let local = snap.join(file);
        let sib = sibling(info, file);
        if local.is_file() {
            if !recheck {
                return Ok(local);
            }
            match check(&local, sib) {
                Ok(()) => return Ok(local),
                Err(why) => {
                    eprintln!("lmspec: {}: {file}: {why}; fetching it again", self.repo);
                    remove_with_blob(&local);
                }
            }
        }
        let what = format!("downloading {file}");
        // A download that fails its check is fetched once more before the
        // run fails.
        let mut attempts = 0;
        let path = loop {
            attempts += 1;
            let path = self.download(handle, file, &local, sib, reporter, &what)?;
            match check(&path, sib) {
                Ok(()) => break path,
                Err(detail) => {
                    remove_with_blob(&path);
                    if attempts >= 2 {
                        return Err(HubError::Corrupt {
                            repo: self.repo.into(),
                            file: file.into(),
                            detail,
                        });
                    }
                    eprintln!("lmspec: {}: {file}: {detail}; fetching it again", self.repo);
                }
            }
        };
        fetched.0 += 1;
        fetched.1 += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Ok(path)
    }

    /// One download of `file` through hf-hub into the snapshot.
    fn download(
        &self,
        handle: &ApiRepo,
        file: &str,
        local: &Path,
        sib: Option<&Sibling>,
        reporter: &Reporter,
        what: &str,
    ) -> Result<PathBuf, HubError> {
        let mut restarted = false;
        let path = loop {
            let out = catch_quietly(|| handle.download_with_progress(file, reporter.file(file)))
                .map_err(|why| {
                    self.network(what, format!("the download library failed ({why})"))
                })?;
            match out {
                Ok(p) => break p,
                // A partial download longer than the file: start over once.
                Err(ApiError::InvalidResume) if !restarted => {
                    restarted = true;
                    remove_oversized_parts(local, sib.and_then(Sibling::size));
                }
                Err(e) => return Err(self.api_error(what, e)),
            }
        };
        if path != local {
            remove_with_blob(&path);
            return Err(self.network(
                what,
                format!(
                    "the revision moved while fetching (now {}); run again",
                    path.parent()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(path)
    }

    fn api_error(&self, what: &str, e: ApiError) -> HubError {
        match e {
            ApiError::RequestError(e) => self.http_error(what, &e),
            ApiError::TooManyRetries(inner) => match self.api_error(what, *inner) {
                HubError::Network { repo, what, detail } => HubError::Network {
                    repo,
                    what,
                    detail: format!("{detail} (after {RETRIES} retries; run again to resume)"),
                },
                other => other,
            },
            ApiError::MissingHeader(h) => {
                self.network(what, format!("the server's answer lacks the {h} header"))
            }
            ApiError::LockAcquisition(p) => self.network(
                what,
                format!("another process holds the lock {}", p.display()),
            ),
            other => self.network(what, other.to_string()),
        }
    }

    fn http_error(&self, what: &str, e: &ureq::Error) -> HubError {
        let has_token = self.opts.token.is_some();
        match e {
            ureq::Error::Status(404, _) if what.starts_with("listing") => HubError::NotFound {
                repo: self.repo.into(),
                endpoint: self.opts.endpoint.clone(),
                hint: if self.revision == DEFAULT_REVISION {
                    String::new()
                } else {
                    format!(" (or it has no revision {})", self.revision)
                },
            },
            ureq::Error::Status(status @ (401 | 403), _) => HubError::Denied {
                repo: self.repo.into(),
                what: what.into(),
                status: *status,
                advice: match (status, has_token) {
                    (401, false) => "the repository is private, gated or absent; set HF_TOKEN to a token with access".into(),
                    (401, true) => "the hub refused the token (HF_TOKEN or the saved token)".into(),
                    (_, false) => "the repository is gated; accept its terms on the hub and set HF_TOKEN".into(),
                    (_, true) => "the token has no access to this repository (gated: accept its terms on the hub)".into(),
                },
            },
            ureq::Error::Status(status, r) => {
                self.network(what, format!("HTTP {status} from {}", r.get_url()))
            }
            ureq::Error::Transport(t) => self.network(what, t.to_string()),
        }
    }
}

/// A repository-relative file name that stays inside the snapshot.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && !name
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
}

/// Size and hash of a fetched file against the hub's listing (the LFS
/// sha256) or its blob name (the ETag: a sha256 for large files, the git
/// blob sha1 for the others).
fn check(path: &Path, sib: Option<&Sibling>) -> Result<(), String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if let Some(size) = sib.and_then(Sibling::size) {
        if len != size {
            return Err(format!("{len} bytes where the hub lists {size}"));
        }
    }
    let etag = std::fs::read_link(path)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_default();
    let lfs = sib
        .and_then(|s| s.lfs.as_ref())
        .and_then(|l| l.sha256.clone())
        .or_else(|| (etag.len() == 64).then(|| etag.clone()));
    if let Some(want) = lfs {
        let got = hex(&digest::<sha2::Sha256>(path, None)?);
        if !got.eq_ignore_ascii_case(&want) {
            return Err(format!("sha256 {got} where the hub lists {want}"));
        }
    } else if etag.len() == 40 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        let got = hex(&digest::<sha1::Sha1>(path, Some(len))?);
        if !got.eq_ignore_ascii_case(&etag) {
            return Err(format!(
                "git blob sha1 {got} where the hub's ETag is {etag}"
            ));
        }
    }
    Ok(())
}

/// The digest of a file; with `git_len`, of git's blob form of it.
fn digest<D: Digest>(path: &Path, git_len: Option<u64>) -> Result<Vec<u8>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut hasher = D::new();
    if let Some(len) = git_len {
        hasher.update(format!("blob {len}\0").as_bytes());
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_vec())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Removes a snapshot entry and the blob it links to.
fn remove_with_blob(pointer: &Path) {
    if let Ok(blob) = std::fs::canonicalize(pointer) {
        if blob != pointer {
            let _ = std::fs::remove_file(blob);
        }
    }
    let _ = std::fs::remove_file(pointer);
}

/// Drops `.part` files in the repository's blob folder that are longer
/// than the file being fetched (a resume hf-hub refuses).
fn remove_oversized_parts(local: &Path, size: Option<u64>) {
    let Some(blobs) = local
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .map(|r| r.join("blobs"))
    else {
        return;
    };
    for (rel, path) in files_under(&blobs) {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if rel.ends_with(".part") && size.is_none_or(|s| len > s) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_checked_by_size_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let blob_dir = dir.path().join("blobs");
        std::fs::create_dir_all(&blob_dir).unwrap();
        let content = b"hello";
        let sha256 = hex(&sha2::Sha256::digest(content));
        let blob = blob_dir.join(&sha256);
        std::fs::write(&blob, content).unwrap();
        let link = dir.path().join("f");
        std::os::unix::fs::symlink(&blob, &link).unwrap();
        let sib = |size, sha: Option<&str>| Sibling {
            rfilename: "f".into(),
            size: Some(size),
            lfs: sha.map(|s| Lfs {
                sha256: Some(s.into()),
                size: Some(size),
            }),
        };
        assert_eq!(check(&link, Some(&sib(5, Some(&sha256)))), Ok(()));
        assert_eq!(check(&link, None), Ok(()));
        assert!(check(&link, Some(&sib(6, None))).unwrap_err().contains("6"));
        let wrong = "0".repeat(64);
        assert!(check(&link, Some(&sib(5, Some(&wrong))))
            .unwrap_err()
            .contains("sha256"));
        // A small file is named by git's blob sha1 ("hello": b6fc4c62...).
        let git = dir.path().join("b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0");
        std::fs::write(&git, content).unwrap();
        let link2 = dir.path().join("g");
        std::os::unix::fs::symlink(&git, &link2).unwrap();
        assert_eq!(check(&link2, None), Ok(()));
        std::fs::write(&git, b"hellO").unwrap();
        assert!(check(&link2, None).unwrap_err().contains("sha1"));
        remove_with_blob(&link2);
        assert!(!git.exists() && !link2.exists());
    }

    #[test]
    fn listing_names_must_stay_inside_the_snapshot() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a\\b",
            "./x",
        ] {
            assert!(!safe_name(bad), "{bad}");
        }
        assert!(safe_name("1_Pooling/config.json"));
    }
}
