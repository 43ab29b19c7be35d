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
//!
//! Every request needs `Authorization: Bearer TOKEN`; errors are
//! `{"error": "..."}` with a 4xx or 5xx status. Handlers hand each request
//! to the coordinator's event loop and wait for its answer, so the API
//! never races the engine.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

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

/// `POST /v1/promotions`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PromoteRequest {
    /// `app@version`.
    pub release: String,
    /// The environment.
    pub env: String,
    /// Skip the pipeline's order (recorded).
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/deployments`; unset fields take the app's defaults.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DeployRequest {
    /// `app@version`.
    pub release: String,
    /// The environment.
    pub env: String,
    /// live, rolling or blue-green.
    pub strategy: Option<String>,
    /// `1,10%,50%,100%`.
    pub waves: Option<String>,
    /// swarm, push or pull.
    pub mode: Option<String>,
    /// A count or a percentage.
    pub max_failures: Option<String>,
    /// How long rolling targets drain.
    pub drain_seconds: Option<f64>,
    /// No progress this long: slow; twice: failed.
    pub progress_deadline_seconds: Option<f64>,
}

/// `POST /v1/rollbacks`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The app.
    pub app: String,
    /// The environment.
    pub env: String,
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
    /// Who asks: `api ADDRESS`.
    pub by: String,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Answer, ApiError>>,
}

#[derive(Clone)]
struct Shared {
    calls: mpsc::Sender<Call>,
    token: String,
}

async fn call(s: &Shared, by: SocketAddr, op: Op) -> Response {
    let (reply, rx) = oneshot::channel();
    let sent = s.calls.send(Call {
        op,
        by: format!("api {by}"),
        reply,
    });
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

async fn authorise(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        // Compared through hashes: the time taken says nothing of the token.
        blake3::hash(g.as_bytes()) == blake3::hash(s.token.as_bytes())
    });
    if ok {
        next.run(req).await
    } else {
        let mut r = ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong bearer token (see --api-token-file)".into(),
        }
        .into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
        r
    }
}

type Peer = ConnectInfo<SocketAddr>;

/// The API's routes.
pub fn router(calls: mpsc::Sender<Call>, token: String) -> Router {
    let s = Shared { calls, token };
    Router::new()
        .route(
            "/v1/pipelines",
            get(|State(s): State<Shared>, ConnectInfo(a): Peer| async move {
                call(&s, a, Op::Pipelines).await
            }),
        )
        .route(
            "/v1/promotions",
            post(
                |State(s): State<Shared>, ConnectInfo(a): Peer, Json(r): Json<PromoteRequest>| async move {
                    call(&s, a, Op::Promote(r)).await
                },
            ),
        )
        .route(
            "/v1/deployments",
            post(
                |State(s): State<Shared>, ConnectInfo(a): Peer, Json(r): Json<DeployRequest>| async move {
                    call(&s, a, Op::Deploy(r)).await
                },
            )
            .get(|State(s): State<Shared>, ConnectInfo(a): Peer| async move {
                call(&s, a, Op::List).await
            }),
        )
        .route(
            "/v1/deployments/{id}",
            get(
                |State(s): State<Shared>, ConnectInfo(a): Peer, Path(id): Path<u64>| async move {
                    call(&s, a, Op::Status(id)).await
                },
            ),
        )
        .route(
            "/v1/deployments/{id}/{action}",
            post(
                |State(s): State<Shared>,
                 ConnectInfo(a): Peer,
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
                |State(s): State<Shared>, ConnectInfo(a): Peer, Json(r): Json<RollbackRequest>| async move {
                    call(&s, a, Op::Rollback(r)).await
                },
            ),
        )
        .route(
            "/v1/apps/{app}/history",
            get(
                |State(s): State<Shared>, ConnectInfo(a): Peer, Path(app): Path<String>| async move {
                    call(&s, a, Op::History(app)).await
                },
            ),
        )
        .route(
            "/v1/fleet",
            get(|State(s): State<Shared>, ConnectInfo(a): Peer| async move {
                call(&s, a, Op::Fleet).await
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Shared>, ConnectInfo(a): Peer| async move {
                call(&s, a, Op::Metrics).await
            }),
        )
        .layer(middleware::from_fn_with_state(s.clone(), authorise))
        .with_state(s)
}

/// Serves the API on `listener` until the process stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    calls: mpsc::Sender<Call>,
    token: String,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(calls, token).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
}

/// Reads the token from `path`, or writes a new random one there
/// (readable by its owner only) if there is none.
pub fn load_or_create_token(path: &std::path::Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is empty", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    Ok(token)
}
