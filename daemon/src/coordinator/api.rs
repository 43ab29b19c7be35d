//! The coordinator's operator API: HTTP and JSON, behind a bearer token.
//!
//! | method and path | what |
//! | --- | --- |
//! | `GET /v1/pipelines` | the pipelines file, as loaded |
//! | `POST /v1/promotions` `{release, env, force}` | promote `app@version` |
//! | `POST /v1/deployments` `{release, env, strategy?, waves?, mode?, max_failures?, drain_seconds?, progress_deadline_seconds?}` | start a roll-out |
//! | `GET /v1/deployments` | every roll-out, newest last, in brief |
//! | `GET /v1/deployments/{id}` | one roll-out in full |
//! | `POST /v1/deployments/{id}/{pause,resume,abort}` | steer it |
//! | `POST /v1/rollbacks` `{app, env}` | an environment back to its previous release |
//! | `GET /v1/apps/{app}/history` | every action on an app |
//! | `GET /v1/fleet` | the targets |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /` | the web view (no token: the page asks for it) |
//!
//! Every request but the web view's needs `Authorization: Bearer TOKEN` with a token of the
//! token file (see [`Tokens`]); a refusal is logged and counted in
//! `/metrics`, and history names the token each action came with. Errors are
//! `{"error": "..."}` with a 4xx or 5xx status. Handlers hand each request
//! to the coordinator's event loop and wait for its answer, so the API
//! never races the engine.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

pub use convoy_protocol::api::{DeployRequest, PromoteRequest, RollbackRequest};

use crate::coordinator::operators::Refusals;

/// What an operator asks for.
#[derive(Debug)]
pub enum Op {
    /// The pipelines.
    Pipelines,
    /// Promote a release.
    Promote(PromoteRequest),
    /// Start a roll-out.
    Deploy(DeployRequest),
    /// Every roll-out, in brief.
    List,
    /// One roll-out.
    Status(u64),
    /// Pause, resume or abort a roll-out.
    Steer(u64, Steer),
    /// Roll an environment back.
    Rollback(RollbackRequest),
    /// An app's history.
    History(String),
    /// The fleet.
    Fleet,
    /// Prometheus metrics.
    Metrics,
}

/// Pause, resume or abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steer {
    /// Stop before the next wave.
    Pause,
    /// Go on.
    Resume,
    /// Roll back and stop.
    Abort,
}

/// A refusal: an HTTP status and why.
#[derive(Debug)]
pub struct ApiError {
    /// 400, 404, 409, 500...
    pub status: StatusCode,
    /// Said to the operator.
    pub message: String,
}

impl ApiError {
    /// 400: the request cannot be carried out as asked.
    pub fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
    /// 409: it conflicts with what runs.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            message: message.into(),
        }
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// The answer: JSON, or the metrics text.
#[derive(Debug)]
pub enum Answer {
    /// A JSON body, with 200 or 201.
    Json(StatusCode, serde_json::Value),
    /// Prometheus text.
    Text(String),
}

/// One request on its way to the coordinator's loop.
pub struct Call {
    /// What is asked.
    pub op: Op,
    /// Who asks: `token NAME from ADDRESS`.
    pub by: String,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Answer, ApiError>>,
}

/// The API's bearer tokens, each under the name history records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// By the BLAKE3 hash of the token: compared through hashes, the time a
    /// comparison takes says nothing of a token.
    by_hash: Vec<(blake3::Hash, String)>,
}

/// Tokens a coordinator accepts, at most.
const MAX_TOKENS: usize = 1024;
/// The name of a token given without one.
const UNNAMED_TOKEN: &str = "api-token";

impl Tokens {
    /// Parses a token file: one token a line, as `TOKEN` or `NAME TOKEN`;
    /// blank lines and `#` comments are skipped. An unnamed token is
    /// named `api-token`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_hash: Vec<(blake3::Hash, String)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (name, token) = match fields[..] {
                [token] => (UNNAMED_TOKEN, token),
                [name, token] => (name, token),
                _ => return Err(format!("line {}: expected TOKEN or NAME TOKEN", n + 1)),
            };
            if token.len() < 16 {
                return Err(format!(
                    "line {}: a token needs 16 characters at least",
                    n + 1
                ));
            }
            let hash = blake3::hash(token.as_bytes());
            if by_hash.iter().any(|(h, _)| *h == hash) {
                return Err(format!("line {}: a token is listed twice", n + 1));
            }
            by_hash.push((hash, name.to_string()));
            if by_hash.len() > MAX_TOKENS {
                return Err(format!("more than {MAX_TOKENS} tokens"));
            }
        }
        if by_hash.is_empty() {
            return Err("no token in it".into());
        }
        Ok(Self { by_hash })
    }

    /// The name of `token`, if it is one of these.
    fn name(&self, token: &str) -> Option<&str> {
        let hash = blake3::hash(token.as_bytes());
        self.by_hash
            .iter()
            .find(|(h, _)| *h == hash)
            .map(|(_, n)| n.as_str())
    }
}

/// The token that goes with a request, from a token file as the
/// coordinator reads it (`TOKEN` or `NAME TOKEN`, the first one listed).
pub fn token_of_file(text: &str) -> Option<&str> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .find(|l| !l.is_empty())
        .and_then(|l| l.split_whitespace().last())
}

#[derive(Clone)]
struct Shared {
    calls: mpsc::Sender<Call>,
    tokens: Arc<Tokens>,
    refusals: Arc<Refusals>,
}

async fn call(s: &Shared, Caller(by): Caller, op: Op) -> Response {
    let (reply, rx) = oneshot::channel();
    let sent = s.calls.send(Call { op, by, reply });
    let answer = match sent.await {
        Ok(()) => rx
            .await
            .unwrap_or_else(|_| Err(ApiError::internal("the coordinator is stopping"))),
        Err(_) => Err(ApiError::internal("the coordinator is stopping")),
    };
    match answer {
        Ok(Answer::Json(status, v)) => (status, Json(v)).into_response(),
        Ok(Answer::Text(t)) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], t).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The name of the token a request carried, put there by [`authorise`].
#[derive(Clone)]
struct TokenName(String);

/// Who asks: `token NAME from ADDRESS`, as history records it.
struct Caller(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let name = parts
            .extensions
            .get::<TokenName>()
            .map_or("?", |n| n.0.as_str());
        let addr = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or_else(|| "?".to_string(), |a| a.0.to_string());
        Ok(Caller(format!("token {name} from {addr}")))
    }
}

async fn authorise(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(name) = given.and_then(|g| s.tokens.name(g)) {
        req.extensions_mut().insert(TokenName(name.to_string()));
        return next.run(req).await;
    }
    let addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "?".to_string(), |a| a.0.to_string());
    warn!(peer = %addr, path = %req.uri().path(), "refused an API request: missing or wrong bearer token");
    Refusals::count(&s.refusals.bad_token);
    let mut r = ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "missing or wrong bearer token (see --api-token-file)".into(),
    }
    .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
    r
}

/// The API's routes.
pub fn router(calls: mpsc::Sender<Call>, tokens: Tokens, refusals: Arc<Refusals>) -> Router {
    let s = Shared {
        calls,
        tokens: Arc::new(tokens),
        refusals,
    };
    Router::new()
        .route(
            "/v1/pipelines",
            get(|State(s): State<Shared>, a: Caller| async move {
                call(&s, a, Op::Pipelines).await
            }),
        )
        .route(
            "/v1/promotions",
            post(
                |State(s): State<Shared>, a: Caller, Json(r): Json<PromoteRequest>| async move {
                    call(&s, a, Op::Promote(r)).await
                },
            ),
        )
        .route(
            "/v1/deployments",
            post(
                |State(s): State<Shared>, a: Caller, Json(r): Json<DeployRequest>| async move {
                    call(&s, a, Op::Deploy(r)).await
                },
            )
            .get(|State(s): State<Shared>, a: Caller| async move {
                call(&s, a, Op::List).await
            }),
        )
        .route(
            "/v1/deployments/{id}",
            get(
                |State(s): State<Shared>, a: Caller, Path(id): Path<u64>| async move {
                    call(&s, a, Op::Status(id)).await
                },
            ),
        )
        .route(
            "/v1/deployments/{id}/{action}",
            post(
                |State(s): State<Shared>,
                 a: Caller,
                 Path((id, action)): Path<(u64, String)>| async move {
                    let steer = match action.as_str() {
                        "pause" => Steer::Pause,
                        "resume" => Steer::Resume,
                        "abort" => Steer::Abort,
                        other => {
                            return ApiError::not_found(format!(
                                "no action {other:?}: use pause, resume or abort"
                            ))
                            .into_response()
                        }
                    };
                    call(&s, a, Op::Steer(id, steer)).await
                },
            ),
        )
        .route(
            "/v1/rollbacks",
            post(
                |State(s): State<Shared>, a: Caller, Json(r): Json<RollbackRequest>| async move {
                    call(&s, a, Op::Rollback(r)).await
                },
            ),
        )
        .route(
            "/v1/apps/{app}/history",
            get(
                |State(s): State<Shared>, a: Caller, Path(app): Path<String>| async move {
                    call(&s, a, Op::History(app)).await
                },
            ),
        )
        .route(
            "/v1/fleet",
            get(|State(s): State<Shared>, a: Caller| async move {
                call(&s, a, Op::Fleet).await
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Shared>, a: Caller| async move {
                call(&s, a, Op::Metrics).await
            }),
        )
        .layer(middleware::from_fn_with_state(s.clone(), authorise))
        .with_state(s)
        // The web view's page and assets need no token: they hold no data.
        .merge(crate::coordinator::web::routes())
}

/// Serves the API on `listener` until the process stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    calls: mpsc::Sender<Call>,
    tokens: Tokens,
    refusals: Arc<Refusals>,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(calls, tokens, refusals).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}

/// Reads the tokens from `path` (see [`Tokens::parse`]), or writes a new
/// random one there (readable by its owner only) if there is none.
pub fn load_or_create_tokens(path: &std::path::Path) -> std::io::Result<Tokens> {
    let invalid = |e: String| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    };
    match std::fs::read_to_string(path) {
        Ok(t) => return Tokens::parse(&t).map_err(invalid),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    crate::durable::create_private(path, format!("{token}\n").as_bytes())?;
    Tokens::parse(&token).map_err(invalid)
}
