//! The HTTP server of `ces-stream run`: Prometheus metrics, health and
//! readiness, and the customer API.
//!
//! - `GET /metrics`: the registry in the Prometheus text format;
//! - `GET /healthz`: the process is alive;
//! - `GET /readyz`: partitions assigned, their state restored and caught up,
//!   the consumer loop turning; 503 with the reasons otherwise;
//! - `GET /v1/customers/{id}`: a customer's current score, tier,
//!   contributions, risk, peak and last event, from the live state of the
//!   partition that owns it (named in the answer); 404 when this instance
//!   owns no such customer;
//! - `GET /v1/tiers`: customers per tier, in all and per partition.
//!
//! Scores are personal data: with `[http] api_token_env`, `/v1/*` needs
//! `Authorization: Bearer <token>` (401 otherwise). Reads lock one
//! partition for one lookup, so they never hold the stream back.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::kafka::pipeline::Shared;
use crate::partition::Clock;
use crate::timestamp::now_millis;

/// A loop turn older than this means the consumer is stalled.
const STALLED_AFTER_MS: i64 = 30_000;

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub shared: Shared,
    pub clock: Clock,
    /// The bearer token `/v1/*` requires, if any.
    pub token: Option<Arc<str>>,
}

/// The routes, ready to serve.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/v1/customers/{id}", get(customer))
        .route("/v1/tiers", get(tiers))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(api)
        .fallback(not_found)
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compare in constant time: the token is a secret.
        let ok = given.is_some_and(|g| {
            g.len() == token.len()
                && g.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        });
        if !ok {
            let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    next.run(request).await
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.shared.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let shared = &state.shared;
    let mut reasons = Vec::new();
    if let Some(why) = shared.health.failed.lock().clone() {
        reasons.push(format!("the pipeline stopped: {why}"));
    }
    if !shared.health.consuming.load(Ordering::SeqCst) {
        reasons.push("the consumer is not running".to_string());
    } else {
        let idle = now_millis() - shared.health.last_turn.load(Ordering::Relaxed);
        if idle > STALLED_AFTER_MS {
            reasons.push(format!("the consumer loop has not turned for {idle} ms"));
        }
    }
    let numbers = shared.partitions.numbers();
    if numbers.is_empty() {
        reasons.push("no partitions assigned".to_string());
    }
    let rebuilding: Vec<i32> = numbers
        .iter()
        .copied()
        .filter(|p| {
            shared
                .partitions
                .get(*p)
                .is_some_and(|s| !s.lock().caught_up())
        })
        .collect();
    if !rebuilding.is_empty() {
        reasons.push(format!(
            "partitions {rebuilding:?} are still rebuilding their state"
        ));
    }
    let body = json!({
        "ready": reasons.is_empty(),
        "partitions": numbers,
        "reasons": reasons,
    });
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn customer(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let shared = &state.shared;
    for p in shared.partitions.numbers() {
        let Some(partition) = shared.partitions.get(p) else {
            continue;
        };
        let st = partition.lock();
        let Some(slot) = st.engine.customers().find(&id) else {
            continue;
        };
        let at = match state.clock {
            Clock::Wall => now_millis()
                .max(st.clock)
                .max(st.engine.live_clock(now_millis())),
            Clock::Event => st.engine.watermark().unwrap_or(st.clock),
        };
        let view = st.engine.view_slot(slot, at);
        drop(st);
        let mut body = Vec::with_capacity(512);
        crate::inspect::write_view(&mut body, &shared.model, &view, Some(p));
        body.pop(); // the newline
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let mut r = error(StatusCode::NOT_FOUND, "unknown customer");
    if let Ok(v) = serde_json::to_vec(&json!({
        "error": "unknown customer",
        "owned_partitions": shared.partitions.numbers(),
    })) {
        r = (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json")],
            v,
        )
            .into_response();
    }
    r
}

async fn tiers(State(state): State<ApiState>) -> Response {
    let shared = &state.shared;
    let names: Vec<&str> = shared.model.tiers.iter().map(|t| &*t.name).collect();
    let mut total = vec![0u64; names.len()];
    let mut at_risk = 0;
    let mut partitions = serde_json::Map::new();
    for p in shared.partitions.numbers() {
        let Some(partition) = shared.partitions.get(p) else {
            continue;
        };
        let st = partition.lock();
        let counts = st.engine.tier_counts().to_vec();
        at_risk += st.engine.at_risk_count();
        drop(st);
        let mut per = serde_json::Map::new();
        for (i, (name, n)) in names.iter().zip(&counts).enumerate() {
            per.insert(name.to_string(), json!(n));
            total[i] += n;
        }
        partitions.insert(p.to_string(), serde_json::Value::Object(per));
    }
    let tiers: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(&total)
        .map(|(n, c)| (n.to_string(), json!(c)))
        .collect();
    Json(json!({
        "tiers": tiers,
        "customers": total.iter().sum::<u64>(),
        "at_risk": at_risk,
        "partitions": partitions,
    }))
    .into_response()
}
