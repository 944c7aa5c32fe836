//! `/livez`, `/readyz` and `/metrics` (contract section 7), beside the pipeline, never inside it,
//! and whatever routes the binary adds (a gateway's).
//!
//! Connections are served one task each (hyper's HTTP/1), not with `axum::serve`, so that a
//! handler can close its own connection at once ([`Disconnect`]): a long response to a client
//! that stopped reading is never polled again once the socket is full, so ending its body would
//! never reach it, and the connection would hold its buffers for as long as the client lives.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::runtime::health::Health;

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// Binds `addr` now (so a taken port is a startup error) and serves in the background, with the
/// binary's own `routes` beside the health and metrics ones.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    routes: Router,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { health, metrics })
        .merge(routes);
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let token = CancellationToken::new();
            let disconnect = Disconnect(token.clone());
            let app = app.clone();
            tokio::spawn(async move {
                // Each request gets the handle (a `layer` per connection would rebuild the
                // router for every connection: 4 KiB each, measured).
                let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
                    request.extensions_mut().insert(disconnect.clone());
                    tower::ServiceExt::oneshot(app.clone(), request)
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    // Dropping the connection closes its socket.
                    _ = token.cancelled() => {}
                }
            });
        }
    }))
}

/// Closes the HTTP connection a request came on, at once, whatever its state (a request
/// extension: `Extension<Disconnect>`).
#[derive(Debug, Clone)]
pub struct Disconnect(CancellationToken);

impl Disconnect {
    /// Closes the connection.
    pub fn now(&self) {
        self.0.cancel();
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let code = if s.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, s.health.describe())
}

async fn render_metrics(State(s): State<AppState>) -> String {
    // Readiness as of this scrape: alerts cannot read /readyz.
    s.health.record();
    s.metrics.render()
}
