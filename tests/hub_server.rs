//! A loopback model hub for tests: the Hugging Face hub's endpoints,
//! headers and redirects, served from memory on 127.0.0.1.
//!
//! - `GET /api/models/ORG/NAME[/revision/REV]`: the listing (`sha`,
//!   `siblings` with sizes and LFS hashes); `.../tree/REV`: the file tree.
//! - `HEAD|GET /ORG/NAME/resolve/REV/FILE`: small files answer directly
//!   (`ETag` = git blob sha1); large ones (`.safetensors`, `.gguf`, over
//!   10 KB) redirect to `/cdn/SHA256` on another host name (`localhost`,
//!   as the hub redirects to its content servers) with `X-Linked-Etag`
//!   and `X-Linked-Size`. Every answer carries `X-Repo-Commit`.
//! - Ranges (`bytes=S-` and `bytes=S-E`), 404s with `X-Error-Code`, gated
//!   repositories (401 without a token, 403 with a wrong one), and faults:
//!   a file that stalls or drops the connection after some bytes, or whose
//!   content does not match its advertised hash.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha1::Digest;

#[derive(Debug, Clone)]
struct File {
    content: Arc<Vec<u8>>,
    sha256: String,
    git_sha1: String,
    lfs: bool,
}

#[derive(Debug, Default)]
struct State {
    repos: HashMap<String, (String, Vec<(String, File)>)>,
    gated: HashMap<String, String>,
    stall: Option<(String, usize)>,
    drop_after: Option<(String, usize)>,
    corrupt: HashMap<String, usize>,
    log: Vec<String>,
}

#[derive(Debug)]
pub struct HubServer {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl HubServer {
    pub fn start() -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, ep) = (state.clone(), stop.clone(), endpoint.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, sp, ep) = (st.clone(), sp.clone(), ep.clone());
                std::thread::spawn(move || serve(conn, &st, &sp, &ep));
            }
        });
        HubServer {
            endpoint,
            state,
            stop,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A repository at a fixed commit derived from its name and files.
    pub fn add_repo(&self, repo: &str, files: Vec<(&str, Vec<u8>)>) -> String {
        let mut commit = sha1::Sha1::new();
        commit.update(repo.as_bytes());
        let files: Vec<(String, File)> = files
            .into_iter()
            .map(|(name, content)| {
                commit.update(name.as_bytes());
                commit.update(&content);
                let mut git = sha1::Sha1::new();
                git.update(format!("blob {}\0", content.len()).as_bytes());
                git.update(&content);
                let lfs = name.ends_with(".safetensors")
                    || name.ends_with(".gguf")
                    || content.len() > 10_000;
                let file = File {
                    sha256: hex(&sha2::Sha256::digest(&content)),
                    git_sha1: hex(&git.finalize()),
                    content: Arc::new(content),
                    lfs,
                };
                (name.to_string(), file)
            })
            .collect();
        let commit = hex(&commit.finalize());
        self.lock()
            .repos
            .insert(repo.to_string(), (commit.clone(), files));
        commit
    }

    pub fn gate(&self, repo: &str, token: &str) {
        self.lock().gated.insert(repo.into(), token.into());
    }

    /// Serving `file` stops after `bytes` bytes until [`Self::release`].
    pub fn stall(&self, file: &str, bytes: usize) {
        self.lock().stall = Some((file.into(), bytes));
    }

    pub fn release(&self) {
        self.lock().stall = None;
    }

    /// Serving `file` closes the connection after `bytes` bytes.
    pub fn drop_after(&self, file: &str, bytes: usize) {
        self.lock().drop_after = Some((file.into(), bytes));
    }

    /// `file` is served with one byte changed (its advertised hash kept).
    pub fn corrupt(&self, file: &str) {
        self.corrupt_times(file, usize::MAX);
    }

    /// Like [`Self::corrupt`] for the next `times` times it is served.
    pub fn corrupt_times(&self, file: &str, times: usize) {
        self.lock().corrupt.insert(file.into(), times);
    }

    /// Requests so far, as `METHOD PATH [range]`, and clears the log.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().log)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release();
        let _ = TcpStream::connect(self.endpoint.trim_start_matches("http://"));
    }
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

fn read_request(conn: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    Some(Request {
        method,
        path,
        headers,
    })
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let _ = conn.write_all(head(status, headers, body.len()).as_bytes());
    let _ = conn.write_all(body);
}

/// A response's status line and headers, with a `Content-Length` of
/// `body_len` unless `headers` has one.
fn head(status: &str, headers: &[(String, String)], body_len: usize) -> String {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        head.push_str(&format!("Content-Length: {body_len}\r\n"));
    }
    head.push_str("\r\n");
    head
}

fn error(conn: &mut TcpStream, status: &str, code: &str, msg: &str) {
    let body = format!("{{\"error\": \"{msg}\"}}");
    let headers = vec![
        ("Content-Type".to_string(), "application/json".to_string()),
        ("X-Error-Code".to_string(), code.to_string()),
    ];
    respond(conn, status, &headers, body.as_bytes());
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, stop: &AtomicBool, endpoint: &str) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Some(req) = read_request(&conn) else {
        return;
    };
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let range = req.headers.get("range").cloned();
    lock().log.push(format!(
        "{} {}{}",
        req.method,
        req.path,
        range
            .as_deref()
            .map(|r| format!(" [{r}]"))
            .unwrap_or_default()
    ));
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    // The content server behind the redirects (no authentication).
    if segs.first() == Some(&"cdn") && segs.len() == 2 {
        let found = lock()
            .repos
            .values()
            .flat_map(|(_, files)| files.iter())
            .find(|(_, f)| f.sha256 == segs[1])
            .cloned();
        match found {
            Some((name, file)) => send_file(&mut conn, &req, state, stop, &name, &file, vec![]),
            None => error(
                &mut conn,
                "404 Not Found",
                "EntryNotFound",
                "no such object",
            ),
        }
        return;
    }
    let (repo, rest): (String, Vec<&str>) = if segs.first() == Some(&"api") && segs.len() >= 4 {
        (format!("{}/{}", segs[2], segs[3]), segs[4..].to_vec())
    } else if segs.len() >= 2 {
        (format!("{}/{}", segs[0], segs[1]), segs[2..].to_vec())
    } else {
        return error(
            &mut conn,
            "404 Not Found",
            "RepoNotFound",
            "Repository not found",
        );
    };
    let (repo_entry, gate) = {
        let st = lock();
        (st.repos.get(&repo).cloned(), st.gated.get(&repo).cloned())
    };
    if let Some(token) = gate {
        match req.headers.get("authorization") {
            None => {
                return error(
                    &mut conn,
                    "401 Unauthorized",
                    "GatedRepo",
                    "Access to this repository is restricted",
                )
            }
            Some(a) if a != &format!("Bearer {token}") => {
                return error(
                    &mut conn,
                    "403 Forbidden",
                    "GatedRepo",
                    "Your token has no access",
                )
            }
            Some(_) => {}
        }
    }
    let Some((commit, files)) = repo_entry else {
        return error(
            &mut conn,
            "404 Not Found",
            "RepoNotFound",
            "Repository not found",
        );
    };
    let rev_ok = |rev: &str| rev == "main" || rev == commit;
    if segs[0] == "api" && rest.first() == Some(&"tree") {
        // The recursive file tree (one page).
        if rest.len() < 2 || !rev_ok(rest[1]) {
            return error(
                &mut conn,
                "404 Not Found",
                "RevisionNotFound",
                "Revision not found",
            );
        }
        let entries: Vec<serde_json::Value> = files
            .iter()
            .map(|(name, f)| {
                let mut e = serde_json::json!({
                    "type": "file", "path": name, "size": f.content.len(), "oid": f.git_sha1,
                });
                if f.lfs {
                    e["lfs"] = serde_json::json!({
                        "oid": f.sha256, "size": f.content.len(), "pointerSize": 134,
                    });
                }
                e
            })
            .collect();
        let headers = vec![("Content-Type".to_string(), "application/json".to_string())];
        let body = serde_json::Value::Array(entries).to_string();
        return respond(&mut conn, "200 OK", &headers, body.as_bytes());
    }
    if segs[0] == "api" {
        if rest.len() >= 2 && rest[0] == "revision" && !rev_ok(&rest[1..].join("/")) {
            return error(
                &mut conn,
                "404 Not Found",
                "RevisionNotFound",
                "Revision not found",
            );
        }
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|(name, f)| {
                let mut s = serde_json::json!({
                    "rfilename": name, "size": f.content.len(), "blobId": f.git_sha1,
                });
                if f.lfs {
                    s["lfs"] = serde_json::json!({
                        "sha256": f.sha256, "size": f.content.len(), "pointerSize": 134,
                    });
                }
                s
            })
            .collect();
        let body = serde_json::json!({
            "_id": "0", "id": repo, "modelId": repo, "sha": commit, "private": false,
            "gated": false, "disabled": false, "tags": [], "siblings": siblings,
        });
        let headers = vec![("Content-Type".to_string(), "application/json".to_string())];
        return respond(&mut conn, "200 OK", &headers, body.to_string().as_bytes());
    }
    if rest.len() < 3 || rest[0] != "resolve" {
        return error(
            &mut conn,
            "404 Not Found",
            "EntryNotFound",
            "not a file URL",
        );
    }
    if !rev_ok(rest[1]) {
        return error(
            &mut conn,
            "404 Not Found",
            "RevisionNotFound",
            "Revision not found",
        );
    }
    let name = rest[2..].join("/");
    let Some((_, file)) = files.iter().find(|(n, _)| *n == name) else {
        let headers = vec![("X-Repo-Commit".to_string(), commit.clone())];
        return respond(&mut conn, "404 Not Found", &headers, b"Entry not found");
    };
    let mut headers = vec![
        ("X-Repo-Commit".to_string(), commit.clone()),
        ("ETag".to_string(), format!("\"{}\"", file.git_sha1)),
    ];
    if file.lfs {
        headers.extend([
            ("X-Linked-Etag".to_string(), format!("\"{}\"", file.sha256)),
            ("X-Linked-Size".to_string(), file.content.len().to_string()),
            (
                "Location".to_string(),
                format!(
                    "{}/cdn/{}",
                    endpoint.replace("127.0.0.1", "localhost"),
                    file.sha256
                ),
            ),
            ("Content-Length".to_string(), "0".to_string()),
        ]);
        return respond(&mut conn, "302 Found", &headers, b"");
    }
    send_file(&mut conn, &req, state, stop, &name, file, headers);
}

/// A file's bytes (a range of them when asked), with the faults set for it.
fn send_file(
    conn: &mut TcpStream,
    req: &Request,
    state: &Mutex<State>,
    stop: &AtomicBool,
    name: &str,
    file: &File,
    mut headers: Vec<(String, String)>,
) {
    let total = file.content.len();
    let (start, end) = match req
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
    {
        Some(spec) => {
            let (s, e) = spec.split_once('-').unwrap_or((spec, ""));
            let s: usize = s.parse().unwrap_or(0);
            let e: usize = e.parse().map(|e: usize| e + 1).unwrap_or(total).min(total);
            if s >= total {
                headers.push(("Content-Range".into(), format!("bytes */{total}")));
                return respond(conn, "416 Range Not Satisfiable", &headers, b"");
            }
            headers.push((
                "Content-Range".into(),
                format!("bytes {s}-{}/{total}", e - 1),
            ));
            (s, e)
        }
        None => (0, total),
    };
    let status = if req.headers.contains_key("range") {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    headers.push(("ETag".into(), format!("\"{}\"", file.sha256)));
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    headers.push(("Content-Length".into(), (end - start).to_string()));
    let mut body = file.content[start..end].to_vec();
    let (corrupt, stall, drop_after) = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        // The size probe (one byte) does not count as a serving.
        let corrupt = match st.corrupt.get_mut(name) {
            Some(n) if *n > 0 && end - start > 1 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        (
            corrupt,
            st.stall.clone().filter(|(f, _)| f == name),
            st.drop_after.clone().filter(|(f, _)| f == name),
        )
    };
    if corrupt && !body.is_empty() {
        let last = body.len() - 1;
        body[last] ^= 0xff;
    }
    if req.method == "HEAD" {
        return respond(conn, status, &headers, b"");
    }
    // A fault counts bytes from the start of the file.
    let cut = stall
        .as_ref()
        .or(drop_after.as_ref())
        .map(|(_, at)| at.saturating_sub(start).min(body.len()))
        .filter(|&c| c < body.len() && end - start > 1);
    let Some(cut) = cut else {
        return respond(conn, status, &headers, &body);
    };
    // Content-Length promises the whole body; only `cut` bytes follow.
    let _ = conn.write_all(head(status, &headers, body.len()).as_bytes());
    let _ = conn.write_all(&body[..cut]);
    let _ = conn.flush();
    if stall.is_some() {
        // Hold the connection until released (or the client goes away).
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let released = state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stall
                .is_none();
            if released || stop.load(Ordering::SeqCst) {
                break;
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Both);
    let mut sink = [0u8; 1];
    let _ = conn.read(&mut sink);
}
