//! lmspec-serve: an OpenAI- and Anthropic-compatible HTTP server over one
//! language model (and optionally one embedder), with continuous batching.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/messages` (Anthropic), `POST /v1/embeddings`, `POST /v1/rerank`,
//! `GET /v1/models`,
//! `GET /health`. HTTP runs on tokio/axum; all model work runs on one engine
//! thread ([`engine`]) that decodes every running request in one batched
//! forward per step. Handlers check requests field by field
//! ([`request`]) and shape the engine's events into each API's responses
//! and server-sent events ([`openai`], [`anthropic`]).
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::mpsc;

pub mod anthropic;
pub mod engine;
pub mod error;
pub mod openai;
pub mod request;

pub use engine::EngineOptions;
use engine::{GenJob, Out, Work};
pub use error::{Api, ApiError};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Bearer token (or Anthropic `x-api-key`) every request must carry.
    pub api_key: Option<String>,
    /// The id the model is served under (`/v1/models`, `model` fields).
    pub model_id: String,
    /// The id of the embedding model, when one is served.
    pub embedding_id: Option<String>,
    /// The id of the reranking model, when one is served.
    pub rerank_id: Option<String>,
}

/// What every handler shares.
#[derive(Debug)]
pub struct Shared {
    work: mpsc::UnboundedSender<Work>,
    pub model_id: String,
    pub embedding_id: Option<String>,
    pub rerank_id: Option<String>,
    api_key: Option<String>,
    next_id: AtomicU64,
}

pub type AppState = Arc<Shared>;

impl Shared {
    /// A fresh id with a prefix (`chatcmpl-1b2c...`).
    pub fn id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:04x}", unix_time())
    }

    /// Checks a request's `model` against the served model.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None => Ok(()),
            Some(m) if m == self.model_id => Ok(()),
            Some(m) => Err(ApiError::not_found(
                format!(
                    "the model '{m}' is not served here (serving '{}')",
                    self.model_id
                ),
                Some("model"),
                "model_not_found",
            )),
        }
    }

    /// Queues a generation and waits for its first output: an error before
    /// the first token comes back as the request's error.
    pub async fn start(
        &self,
        mut job: GenJob,
    ) -> Result<(mpsc::UnboundedReceiver<Out>, Out), ApiError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        job.out = tx;
        self.work
            .send(Work::Generate(Box::new(job)))
            .map_err(|_| ApiError::internal("the engine has stopped"))?;
        match rx.recv().await {
            Some(Out::Failed(e)) => Err(e),
            Some(first) => Ok((rx, first)),
            None => Err(ApiError::internal("the engine dropped the request")),
        }
    }

    /// Ranks documents on the engine thread.
    pub async fn rerank(
        &self,
        query: String,
        documents: Vec<String>,
        top_n: Option<usize>,
    ) -> Result<Vec<(usize, f32)>, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.work
            .send(Work::Rerank {
                query,
                documents,
                top_n,
                reply: tx,
            })
            .map_err(|_| ApiError::internal("the engine has stopped"))?;
        rx.await
            .map_err(|_| ApiError::internal("the engine dropped the request"))?
    }

    /// Embeds texts on the engine thread.
    pub async fn embed(&self, texts: Vec<String>) -> Result<engine::Embedded, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.work
            .send(Work::Embed { texts, reply: tx })
            .map_err(|_| ApiError::internal("the engine has stopped"))?;
        rx.await
            .map_err(|_| ApiError::internal("the engine dropped the request"))?
    }
}

/// Seconds since the epoch.
pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The router over a shared state.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/rerank", post(openai::rerank))
        .route("/v1/models", get(openai::models))
        .route("/v1/messages", post(anthropic::messages))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(32 << 20))
        .with_state(state)
}

/// Liveness, with MLX's memory counters (bytes in use by arrays, held in
/// its buffer cache, and the peak).
async fn health() -> Response {
    let m = |r: Result<usize, mlx_rs::error::Exception>| {
        r.map_or(serde_json::Value::Null, |v| v.into())
    };
    axum::Json(serde_json::json!({
        "status": "ok",
        "memory": {
            "active_bytes": m(lmspec_engine::memory::active_bytes()),
            "cache_bytes": m(mlx_rs::memory::cache_memory()),
            "peak_bytes": m(lmspec_engine::memory::peak_bytes()),
        },
    }))
    .into_response()
}

async fn not_found(req: Request) -> Response {
    ApiError::not_found(
        format!("{} {}: no such endpoint", req.method(), req.uri().path()),
        None,
        "unknown_url",
    )
    .into_response()
}

/// The API key check (`Authorization: Bearer K` or `x-api-key: K`);
/// `/health` is open.
async fn auth(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(key) = &state.api_key else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let api = if req.uri().path() == "/v1/messages" {
        Api::Anthropic
    } else {
        Api::OpenAi
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    match given {
        Some(g) if g == key => next.run(req).await,
        Some(_) => ApiError::unauthorized("the API key is not valid")
            .for_api(api)
            .into_response(),
        None => ApiError::unauthorized("an API key is required (Authorization: Bearer KEY)")
            .for_api(api)
            .into_response(),
    }
}

/// Starts the engine thread, which builds its engine with `load` (MLX
/// state stays on the thread that made it), then binds, prints
/// `lmspec serve: listening on http://HOST:PORT` and serves until SIGINT or
/// SIGTERM. An error of `load` is returned before anything listens.
pub fn serve<F>(load: F, opts: ServeOptions) -> Result<(), String>
where
    F: FnOnce() -> Result<engine::Engine, String> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("lmspec-engine".into())
        .spawn(move || match load() {
            Ok(engine) => {
                let _ = ready_tx.send(Ok(()));
                engine.run(rx)
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        })
        .map_err(|e| e.to_string())?;
    ready_rx
        .recv()
        .map_err(|_| "the engine thread ended while loading".to_string())??;
    let state = Arc::new(Shared {
        work: tx,
        model_id: opts.model_id.clone(),
        embedding_id: opts.embedding_id.clone(),
        rerank_id: opts.rerank_id.clone(),
        api_key: opts.api_key.clone(),
        next_id: AtomicU64::new(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (host, port) = (opts.host.clone(), opts.port);
    let served: std::io::Result<()> = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host.as_str(), port)).await?;
        let addr: SocketAddr = listener.local_addr()?;
        println!("lmspec serve: listening on http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown())
            .await
    });
    drop(rt);
    let _ = worker.join();
    served.map_err(|e| format!("{}:{}: {e}", opts.host, opts.port))
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    eprintln!("lmspec serve: shutting down");
}
