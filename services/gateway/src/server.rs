//! HTTP surface: the WebSocket endpoint (`/{documentId}?sessionKey=…`), `/healthz`, `/readyz`,
//! `POST /admin/revoke` ([`crate::admin`]), and the one shutdown path (stop accepting, tell
//! connections to finish, wait with a deadline).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt as _;
use axum::{Extension, Router};
use futures::StreamExt as _;
use secsync_protocol::parse_connect;

use crate::admission::Slot;
use crate::gateway::Gateway;
use crate::session;
use crate::ws::{Upgrade, UpgradeError};

/// The router: every path is a document unless it is a plain GET of a health endpoint.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        // Any other method on that path is a document like any other.
        .route(
            crate::admin::REVOKE_PATH,
            post(crate::admin::revoke).fallback(handle),
        )
        .fallback(handle)
        .with_state(gateway)
}

async fn handle(
    State(gateway): State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    mut request: Request,
) -> Response {
    let upgrade = match Upgrade::from_request(&mut request) {
        Ok(upgrade) => upgrade,
        Err(UpgradeError::NotUpgrade) => {
            return match request.uri().path() {
                "/healthz" => (StatusCode::OK, "ok").into_response(),
                "/readyz" if gateway.ready() => (StatusCode::OK, "ready").into_response(),
                "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response(),
                _ => StatusCode::NOT_FOUND.into_response(),
            };
        }
        Err(error) => return error.response(),
    };
    let (headers, uri) = (request.headers(), request.uri());
    if gateway.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("\u{fffd}"));
    if !gateway.origins.allows(origin) {
        tracing::info!(origin, "upgrade refused: origin not allowed");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    // Without connect info (a router served another way) there is no address to count.
    let ip = match peer.map(|Extension(ConnectInfo(peer))| peer.ip()) {
        Some(ip) => {
            let Ok(place) = gateway.per_ip.acquire(ip) else {
                tracing::info!(%ip, "upgrade refused: too many connections from the address");
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections from this address",
                )
                    .into_response();
            };
            place
        }
        None => None,
    };
    let Ok(permit) = gateway.connections.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    let slot = Slot { permit, ip };
    // The raw (still percent-encoded) path; never log the query, it holds the session key.
    let path = uri.path();
    let path = path
        .strip_prefix(gateway.path_prefix.as_str())
        .unwrap_or(path);
    let request = parse_connect(path, uri.query());
    let request = request.map(Box::new);
    let connection = gateway.next_connection();
    let (response, upgraded) = upgrade.accept();
    let tasks = gateway.tasks.clone();
    tasks.spawn(session::run(gateway, upgraded, request, connection, slot));
    response
}

/// Applies every revocation from the bus, for as long as the gateway exists.
async fn apply_revocations(
    gateway: std::sync::Weak<Gateway>,
    mut revocations: crate::bus::RevocationStream,
) {
    while let Some(revocation) = revocations.next().await {
        let Some(gateway) = gateway.upgrade() else {
            return;
        };
        // Cached decisions first: the clients whose sessions end reconnect at once.
        gateway.auth.revoked(&revocation);
        gateway.revocations.apply(&revocation);
    }
}

/// Serves on `listener` until `shutdown` resolves, then drains: readiness false, no new
/// connections, every connection finishes the frame it is handling and is closed with 1012
/// ("service restart") so its client reconnects elsewhere; waits at most `drain` for that.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let token = gateway.shutdown.clone();
    // Subscribed before serving: a revocation published once this gateway takes connections
    // reaches it.
    let revocations = gateway
        .bus
        .subscribe_revocations()
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(apply_revocations(Arc::downgrade(&gateway), revocations));
    let app = router(gateway.clone()).into_make_service_with_connect_info::<SocketAddr>();
    // Without TCP_NODELAY a small frame written right after another (the 101 response and the
    // `document` frame, an acknowledgement after a broadcast) waits for the peer's delayed ACK:
    // about 40 ms on Linux.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        token.cancel();
    });
    server.await?;
    gateway.tasks.close();
    if tokio::time::timeout(drain, gateway.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(open = gateway.open_connections(), "drain deadline reached");
    }
    Ok(())
}
