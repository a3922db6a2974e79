//! The admin HTTP listener, apart from gRPC: `/metrics` (Prometheus text) and `/healthz` (200
//! while the database answers, 503 otherwise) for orchestrators and scrapers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::svc::ServiceContext;
use crate::telemetry::metric;

#[derive(Clone)]
struct AdminState {
    svc: Arc<ServiceContext>,
    database_up: Arc<AtomicBool>,
}

/// The admin routes; `database_up` is kept current by the server's database monitor.
pub fn router(svc: Arc<ServiceContext>, database_up: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(AdminState { svc, database_up })
}

async fn metrics(State(state): State<AdminState>) -> String {
    metric::record_pool(
        &state.svc.pool,
        state.svc.users.stashed(),
        state.svc.users.waiting(),
    );
    let handle = metric::prometheus();
    handle.run_upkeep();
    handle.render()
}

async fn healthz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.database_up.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
    }
}
