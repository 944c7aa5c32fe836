//! `GET /events?topic=<pattern>` (repeatable): a `text/event-stream` of the events published on
//! channels the topics match, after what the browser missed when it sends `Last-Event-ID` (or
//! `?last_event_id=` on a first connect). The token comes as `Authorization: Bearer …` or
//! `?access_token=…` (`EventSource` cannot set headers).
//!
//! Order of a connection's start, so that nothing falls in a seam: subscribe live (and wait for
//! Redis to confirm the patterns), then read the history, then stream the live events buffered
//! meanwhile, skipping per stream any entry id not after the last one sent.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use bytes::Bytes;
use streamfleet::event::pattern::ChannelPattern;
use streamfleet::runtime::conn::Conn;
use streamfleet::runtime::http::Disconnect;
use streamfleet::runtime::shutdown::Shutdown;
use tokio::sync::OnceCell;

use crate::auth::{Auth, Denied};
use crate::cursor;
use crate::hub::Hub;
use crate::live::Live;
use crate::metrics as m;
use crate::routes::Routes;
use crate::sse;

/// How long a new connection waits for Redis to confirm its subscriptions.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// Which browser pages may read the streams.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    any: bool,
    origins: Vec<String>,
}

impl Cors {
    pub fn new(origins: &[String]) -> Cors {
        let origins: Vec<String> = origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        Cors {
            any: origins.iter().any(|o| o == "*"),
            origins,
        }
    }

    /// The refusal of a page from an origin not configured (a request without an Origin is no
    /// browser page's, or a same-origin one: served).
    fn refuse(&self, origin: Option<&HeaderValue>) -> Option<Response> {
        let origin = origin?.to_str().unwrap_or_default();
        let allowed = self.any || self.origins.iter().any(|o| o == origin);
        (!allowed).then(|| refuse(StatusCode::FORBIDDEN, "origin", "origin not allowed".into()))
    }

    fn headers(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if let Some(origin) = origin {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                if self.any {
                    HeaderValue::from_static("*")
                } else {
                    origin.clone()
                },
            );
            headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
}

/// Everything a connection needs.
pub struct App {
    pub hub: Arc<Hub>,
    pub routes: Routes,
    pub auth: Auth,
    pub cors: Cors,
    /// The command connection (history, state): set once Redis answered.
    pub redis: OnceCell<Conn>,
    pub shutdown: Shutdown,
    pub keepalive: Duration,
    pub retry_ms: u64,
    pub max_resume: usize,
    pub max_topics: usize,
}

/// The gateway's routes, served beside `/livez`, `/readyz` and `/metrics`.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/events", get(events).options(preflight))
        .with_state(app)
}

fn refuse(status: StatusCode, reason: &'static str, text: String) -> Response {
    metrics::counter!(m::REFUSALS, "reason" => reason).increment(1);
    let mut response = (status, format!("{text}\n")).into_response();
    let headers = response.headers_mut();
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// "Come back later" as `EventSource` understands it: a 200 stream of `retry:` and a comment,
/// ended at once, so that the browser reconnects (through the load balancer, perhaps to another
/// instance). Any other status would close a browser's `EventSource` for good.
fn later(app: &App, origin: Option<&HeaderValue>, why: String) -> Response {
    metrics::counter!(m::REFUSALS, "reason" => "unavailable").increment(1);
    let mut body = sse::retry(app.retry_ms).to_vec();
    body.extend_from_slice(format!(": unavailable: {}\n\n", why.replace('\n', " ")).as_bytes());
    let mut response = Response::new(Body::from(body));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    app.cors.headers(origin, h);
    response
}

/// A CORS preflight, for clients that send the token as a header.
async fn preflight(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let origin = headers.get(header::ORIGIN);
    if let Some(refused) = app.cors.refuse(origin) {
        return refused;
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    let h = response.headers_mut();
    app.cors.headers(origin, h);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, last-event-id, cache-control"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

async fn events(
    State(app): State<Arc<App>>,
    disconnect: Option<Extension<Disconnect>>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let origin = headers.get(header::ORIGIN);
    if let Some(refused) = app.cors.refuse(origin) {
        return refused;
    }
    if app.shutdown.is_triggered() {
        return later(&app, origin, "this instance is stopping".into());
    }
    let param = |name: &'static str| {
        params
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v)
    };
    let mut topics: Vec<ChannelPattern> = Vec::new();
    for t in param("topic") {
        match t.parse::<ChannelPattern>() {
            Ok(p) if !topics.contains(&p) => topics.push(p),
            Ok(_) => {}
            Err(e) => return refuse(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        }
    }
    if topics.is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "no topic: GET /events?topic=<channel pattern>".into(),
        );
    }
    if topics.len() > app.max_topics {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{} topics: at most {}", topics.len(), app.max_topics),
        );
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let token = bearer.or_else(|| param("access_token").next().map(String::as_str));
    if let Err(denied) = app.auth.check(token, &topics) {
        return match denied {
            Denied::Topic(_) => refuse(StatusCode::FORBIDDEN, "forbidden", denied.to_string()),
            _ => refuse(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                denied.to_string(),
            ),
        };
    }
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or_else(|| param("last_event_id").next().map(String::as_str));
    let Some(redis) = app.redis.get() else {
        return later(&app, origin, "Redis is not reachable yet".into());
    };

    let with_globs: Vec<(ChannelPattern, Vec<String>)> = topics
        .iter()
        .map(|t| (t.clone(), app.routes.globs(t)))
        .collect();
    let mut subscription = app
        .hub
        .subscribe(&with_globs, disconnect.map(|Extension(d)| d));
    let waits = std::mem::take(&mut subscription.confirmed);
    let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, futures_util::future::join_all(waits));
    match confirmed.await {
        Ok(results) if results.iter().all(|r| r.is_ok()) => {}
        _ => return later(&app, origin, "the Pub/Sub subscription is not ready".into()),
    }

    let mut stream = Live::new(
        subscription,
        sse::retry(app.retry_ms),
        app.keepalive,
        app.shutdown.clone(),
        redis.clone(),
    );
    if let Some(text) = last_event_id {
        if let Err((topic, e)) = stream
            .resume(&app.routes, &topics, cursor::parse(text), app.max_resume)
            .await
        {
            tracing::warn!(error = %e, topic = %topic, "resume failed");
            return later(&app, origin, format!("resume of {topic} failed: {e}"));
        }
    }

    let body = futures_util::stream::unfold(stream, |mut s| async move {
        s.next()
            .await
            .map(|b| (Ok::<Bytes, std::convert::Infallible>(b), s))
    });
    let mut response = Response::new(Body::from_stream(body));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    // no-transform: proxies must not compress or rewrite the stream.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    app.cors.headers(origin, h);
    response
}
