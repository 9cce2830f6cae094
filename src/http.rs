//! The HTTP server of `ces-stream run`: Prometheus metrics, health and
//! readiness, and the customer API.
//!
//! - `GET /metrics`: the registry in the Prometheus text format;
//! - `GET /healthz`: the process is alive;
//! - `GET /readyz`: partitions assigned, their state restored and caught up,
//!   the consumer loop turning; 503 with the reasons otherwise;
//! - `GET /v1/customers/{id}`: a customer's current score, tier,
//!   contributions, risk, peak and last event, from the live state of the
//!   partition that owns it (named in the answer), whichever instance of
//!   the group is asked: the customer's partition is computed as the
//!   producers compute it (`[kafka] partitioner`) and a request for a
//!   partition another instance owns is forwarded to it (see
//!   [`crate::kafka::members`]). 404 means the owner has no such customer;
//!   503 with `Retry-After` that no one can tell right now (the partition
//!   is restoring its state, or the group is rebalancing);
//! - `GET /v1/tiers`: customers per tier, in all and per partition, for
//!   the whole group (the other instances are asked for theirs), with the
//!   instances that answered.
//!
//! A forwarded request carries `X-Ces-Forwarded: 1` and is answered from
//! local state or with 503, never forwarded again: no loops. Every `/v1/*`
//! answer names the instance that computed it in `X-Ces-Instance`.
//!
//! Scores are personal data: with `[http] api_token_env`, `/v1/*` needs
//! `Authorization: Bearer <token>` (401 otherwise); a forwarded request
//! carries the caller's. Reads lock one partition for one lookup, so they
//! never hold the stream back.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::kafka::members::{Members, Owner};
use crate::kafka::partitioner::Partitioner;
use crate::kafka::shared::Shared;
use crate::model::Clock;
use crate::timestamp::now_millis;

/// A loop turn older than this means the consumer is stalled.
const STALLED_AFTER_MS: i64 = 30_000;
/// Marks a request another instance forwarded: answer it locally.
const FORWARDED: &str = "x-ces-forwarded";
/// Names the instance that computed an answer.
const INSTANCE: &str = "x-ces-instance";
/// How long a forwarded request may take; past it, 503.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    pub shared: Shared,
    pub clock: Clock,
    /// The bearer token `/v1/*` requires, if any.
    pub token: Option<Arc<str>>,
    /// How to reach the rest of the group; `None`: this instance answers
    /// for its own partitions only.
    pub routing: Option<Routing>,
}

/// How requests reach the instance that owns a customer.
#[derive(Clone)]
pub struct Routing {
    pub members: Arc<Members>,
    pub partitioner: Partitioner,
    client: reqwest::Client,
}

impl Routing {
    /// `forward_ca`: the PEM certificates an `https://` instance's
    /// certificate must chain to; `None`: the system's trust store.
    pub fn new(
        members: Arc<Members>,
        partitioner: Partitioner,
        forward_ca: Option<&[u8]>,
    ) -> Result<Routing, reqwest::Error> {
        // One crypto provider for the process, which rustls needs chosen
        // (librdkafka's TLS is OpenSSL's own); a second call finds it
        // installed. ring, not aws-lc-rs: it builds in seconds without
        // cmake; rustls deprecates it only for lacking post-quantum key
        // exchange, which requests between a group's instances can go
        // without.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(FORWARD_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .tls_backend_rustls();
        if let Some(pem) = forward_ca {
            builder = builder.tls_certs_only(reqwest::Certificate::from_pem_bundle(pem)?);
        }
        Ok(Routing {
            members,
            partitioner,
            client: builder.build()?,
        })
    }

    /// The input partition of `id`, if the partition count is known.
    fn partition_of(&self, id: &str) -> Option<i32> {
        let count = self.members.input_partitions()?;
        Some(self.partitioner.partition(id.as_bytes(), count))
    }

    /// GET `path` (as segments) on the instance at `base`.
    async fn get(
        &self,
        base: &str,
        segments: &[&str],
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, String> {
        let mut url = reqwest::Url::parse(base).map_err(|e| e.to_string())?;
        url.path_segments_mut()
            .map_err(|()| format!("{base} cannot take a path"))?
            .clear()
            .extend(segments);
        let mut request = self.client.get(url).header(FORWARDED, "1");
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        request.send().await.map_err(|e| e.to_string())
    }
}

/// The routes, ready to serve.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/v1/customers/{id}", get(customer))
        .route("/v1/tiers", get(tiers))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route_layer(middleware::from_fn_with_state(state.clone(), name_instance));
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
        // Compare in constant time: the token is a secret (only its
        // length can show).
        let ok = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes())));
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

/// `X-Ces-Instance` on every `/v1/*` answer this instance computed (a
/// forwarded answer keeps the owner's).
async fn name_instance(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if let Some(routing) = &state.routing {
        if !response.headers().contains_key(INSTANCE) {
            if let Ok(v) = HeaderValue::from_str(&routing.members.url) {
                response.headers_mut().insert(INSTANCE, v);
            }
        }
    }
    response
}

/// 503 with `Retry-After: 1`: ask again in a moment.
fn unavailable(message: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
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

async fn customer(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let shared = &state.shared;
    let home = state.routing.as_ref().and_then(|r| r.partition_of(&id));
    // The home partition first, then the others: a partitioner that does
    // not match the producers' still finds a customer that is here.
    let mut numbers = shared.partitions.numbers();
    if let Some(p) = home {
        numbers.sort_by_key(|n| *n != p);
    }
    for p in numbers {
        let Some(partition) = shared.partitions.get(p) else {
            continue;
        };
        let partition_state = partition.lock();
        let Some(slot) = partition_state.engine.customers().find(&id) else {
            continue;
        };
        if !partition_state.caught_up() {
            return unavailable(&format!("partition {p} is still restoring its state"));
        }
        if home.is_some_and(|h| h != p) {
            tracing::warn!(
                customer = %id,
                partition = p,
                computed = ?home,
                "a customer is in another partition than [kafka] partitioner computes: set it to the producers' partitioner"
            );
        }
        let at = match state.clock {
            Clock::Wall => now_millis()
                .max(partition_state.clock)
                .max(partition_state.engine.live_clock(now_millis())),
            Clock::Event => partition_state
                .engine
                .watermark()
                .unwrap_or(partition_state.clock),
        };
        let view = partition_state.engine.view_slot(slot, at);
        drop(partition_state);
        let mut body = Vec::with_capacity(512);
        crate::inspect::write_view(&mut body, &shared.model, &view, Some(p));
        body.pop(); // the newline
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let Some(routing) = &state.routing else {
        return unknown_customer(shared, None);
    };
    let Some(p) = home else {
        routing.count("unavailable", shared);
        return unavailable("the input topic's partition count is not known yet");
    };
    if let Some(partition) = shared.partitions.get(p) {
        if !partition.lock().caught_up() {
            return unavailable(&format!("partition {p} is still restoring its state"));
        }
        return unknown_customer(shared, Some(p));
    }
    if headers.contains_key(FORWARDED) {
        // Whoever forwarded it believed this instance owns partition p: the
        // claims are changing hands. Forwarding again could loop.
        routing.count("unavailable", shared);
        return unavailable(&format!(
            "partition {p} is not owned here (the group is rebalancing)"
        ));
    }
    let Owner::Remote(url) = routing.members.owner(p) else {
        routing.count("unavailable", shared);
        return unavailable(&format!(
            "partition {p} has no owner right now (the group is rebalancing)"
        ));
    };
    let auth = headers.get(header::AUTHORIZATION);
    match routing.get(&url, &["v1", "customers", &id], auth).await {
        Ok(answer) => {
            routing.count("forwarded", shared);
            relay(answer, &url).await
        }
        Err(e) => {
            routing.count("failed", shared);
            tracing::debug!(owner = %url, error = %e, "cannot forward a customer request");
            unavailable(&format!("the owner of partition {p} cannot be reached"))
        }
    }
}

impl Routing {
    fn count(&self, outcome: &str, shared: &Shared) {
        shared
            .metrics
            .api_routed
            .with_label_values(&[outcome])
            .inc();
    }
}

/// The owner's answer, as it gave it.
async fn relay(answer: reqwest::Response, owner: &str) -> Response {
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::RETRY_AFTER,
        header::WWW_AUTHENTICATE,
    ] {
        if let Some(v) = answer.headers().get(name.as_str()) {
            if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                out.insert(name, v);
            }
        }
    }
    let instance = answer
        .headers()
        .get(INSTANCE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        .or_else(|| HeaderValue::from_str(owner).ok());
    if let Some(v) = instance {
        out.insert(INSTANCE, v);
    }
    match answer.bytes().await {
        Ok(body) => (status, out, body.to_vec()).into_response(),
        Err(_) => unavailable("the owner's answer was cut short"),
    }
}

/// 404: this instance owns the customer's partition (or, without routing,
/// answers for its own partitions only) and has no such customer.
fn unknown_customer(shared: &Shared, partition: Option<i32>) -> Response {
    let mut body = json!({
        "error": "unknown customer",
        "owned_partitions": shared.partitions.numbers(),
    });
    if let Some(p) = partition {
        body["partition"] = json!(p);
    }
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// One partition's counts.
struct PartitionTiers {
    tiers: Vec<u64>,
    at_risk: u64,
}

/// The counts of the partitions this instance owns.
fn local_tiers(shared: &Shared) -> BTreeMap<i32, PartitionTiers> {
    let mut out = BTreeMap::new();
    for p in shared.partitions.numbers() {
        let Some(partition) = shared.partitions.get(p) else {
            continue;
        };
        let partition_state = partition.lock();
        let counts = PartitionTiers {
            tiers: partition_state.engine.tier_counts().to_vec(),
            at_risk: partition_state.engine.at_risk_count(),
        };
        out.insert(p, counts);
    }
    out
}

/// Another instance's `partitions` object, read back.
fn parse_partitions(
    body: &serde_json::Value,
    names: &[&str],
) -> Option<BTreeMap<i32, PartitionTiers>> {
    let mut out = BTreeMap::new();
    for (p, v) in body.get("partitions")?.as_object()? {
        let tiers = names
            .iter()
            .map(|n| v.get("tiers")?.get(*n)?.as_u64())
            .collect::<Option<Vec<u64>>>()?;
        let at_risk = v.get("at_risk")?.as_u64()?;
        out.insert(p.parse().ok()?, PartitionTiers { tiers, at_risk });
    }
    Some(out)
}

async fn tiers(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let shared = &state.shared;
    let names: Vec<&str> = shared.model.tiers.iter().map(|t| &*t.name).collect();
    let mut partitions = local_tiers(shared);
    let mut instances = Vec::new();
    let me = state.routing.as_ref().map(|r| r.members.url.clone());
    instances.push(json!({
        "url": me,
        "partitions": partitions.keys().collect::<Vec<_>>(),
    }));
    let mut complete = None;
    if let Some(routing) = state
        .routing
        .as_ref()
        .filter(|_| !headers.contains_key(FORWARDED))
    {
        let auth = headers.get(header::AUTHORIZATION);
        let asks = routing.members.others().into_iter().map(|url| async move {
            let answer = match routing.get(&url, &["v1", "tiers"], auth).await {
                Ok(a) if a.status().is_success() => match a.bytes().await {
                    Ok(b) => {
                        serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                },
                Ok(a) => Err(format!("answered {}", a.status())),
                Err(e) => Err(e),
            };
            (url, answer)
        });
        for (url, answer) in futures::future::join_all(asks).await {
            match answer.map(|v| {
                parse_partitions(&v, &names)
                    .ok_or_else(|| "an answer without per-partition counts".to_string())
            }) {
                Ok(Ok(theirs)) => {
                    instances.push(
                        json!({ "url": url, "partitions": theirs.keys().collect::<Vec<_>>() }),
                    );
                    for (p, counts) in theirs {
                        // Mid-rebalance two instances may both count a
                        // partition: count it once.
                        partitions.entry(p).or_insert(counts);
                    }
                }
                Ok(Err(e)) | Err(e) => instances.push(json!({ "url": url, "error": e })),
            }
        }
        complete = routing
            .members
            .input_partitions()
            .map(|n| (0..n).all(|p| partitions.contains_key(&p)));
    }
    let mut total = vec![0u64; names.len()];
    let mut at_risk = 0;
    let mut per = serde_json::Map::new();
    for (p, counts) in &partitions {
        let mut tiers = serde_json::Map::new();
        for (i, (name, n)) in names.iter().zip(&counts.tiers).enumerate() {
            tiers.insert(name.to_string(), json!(n));
            total[i] += n;
        }
        at_risk += counts.at_risk;
        per.insert(
            p.to_string(),
            json!({
                "tiers": tiers,
                "customers": counts.tiers.iter().sum::<u64>(),
                "at_risk": counts.at_risk,
            }),
        );
    }
    let tiers: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(&total)
        .map(|(n, c)| (n.to_string(), json!(c)))
        .collect();
    let mut body = json!({
        "tiers": tiers,
        "customers": total.iter().sum::<u64>(),
        "at_risk": at_risk,
        "partitions": per,
        "instances": instances,
    });
    if let Some(complete) = complete {
        body["complete"] = json!(complete);
    }
    Json(body).into_response()
}
