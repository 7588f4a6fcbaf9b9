//! HTTP for operators and Kubernetes probes: `/healthz` (the process serves requests; never
//! depends on a leader), `/readyz` (a leader is known and apply is close to commit) and
//! `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::raft::{Raft, ServerState};
use crate::server::accept_until_stopped;
use crate::storage::state_machine::SharedState;

/// A member is ready while it applies within this many entries of the commit index.
pub const READY_MAX_APPLY_LAG: u64 = 1000;

#[derive(Clone)]
pub struct HttpContext {
    pub raft: Raft,
    pub state: SharedState,
    pub committed: Arc<AtomicU64>,
    pub metrics: Arc<Metrics>,
}

pub async fn serve(
    listener: TcpListener,
    ctx: HttpContext,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    while let Some(stream) = accept_until_stopped(&listener, &mut shutdown, "http").await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(route(&ctx, &req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
}

fn route(ctx: &HttpContext, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match not_ready_reason(ctx) {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            refresh_gauges(ctx);
            text(StatusCode::OK, ctx.metrics.encode())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

fn not_ready_reason(ctx: &HttpContext) -> Option<String> {
    let metrics = ctx.raft.metrics().borrow().clone();
    if metrics.current_leader.is_none() {
        return Some("no leader known".into());
    }
    let applied = ctx.state.read().applied_index();
    let committed = ctx.committed.load(Ordering::Relaxed);
    let lag = committed.saturating_sub(applied);
    (lag > READY_MAX_APPLY_LAG)
        .then(|| format!("applied index {applied} is {lag} entries behind commit {committed}"))
}

fn refresh_gauges(ctx: &HttpContext) {
    let raft = ctx.raft.metrics().borrow().clone();
    let (applied, znodes) = {
        let s = ctx.state.read();
        (s.applied_index(), s.state.node_count())
    };
    let committed = ctx.committed.load(Ordering::Relaxed).max(applied);
    let m = &ctx.metrics;
    m.term.set(raft.current_term as i64);
    m.leader_id.set(raft.current_leader.unwrap_or(0) as i64);
    m.is_leader
        .set(i64::from(raft.state == ServerState::Leader));
    m.commit_index.set(committed as i64);
    m.applied_index.set(applied as i64);
    m.apply_lag.set(committed.saturating_sub(applied) as i64);
    m.znodes.set(znodes as i64);
}
