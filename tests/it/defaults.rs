//! The server's safety nets, on by default: deadlines, load shedding, panic recovery, slow-call
//! log, metrics and health over the admin port, bounded graceful shutdown.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::{Code, Request};
use user_rpc::config::Config;
use user_rpc::error::Error;
use user_rpc::pb::{self, Strategy};
use user_rpc::server::call::{CallGuard, CallInfo};

use crate::support::{TestServer, context, lock_users, seed, unreachable_pool};

fn batch_request(
    ids: Vec<i64>,
    strategy: Strategy,
    timeout: Option<Duration>,
) -> Request<pb::BatchGetUsersRequest> {
    let mut request = Request::new(pb::BatchGetUsersRequest {
        ids,
        strategy: strategy.into(),
        allow_missing: false,
    });
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

/// A plain HTTP/1.1 GET on the admin port: (status code, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn without_a_client_deadline_the_server_default_applies(pool: PgPool) {
    let users = seed(&pool, 5).await;
    let server =
        TestServer::start(context(&pool, |c| c.timeout = Duration::from_millis(200))).await;
    let mut client = server.client().await;
    let lock = lock_users(&pool).await;
    let started = Instant::now();
    let status = client
        .batch_get_users(batch_request(vec![users[0].id], Strategy::Errgroup, None))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(1),
        "took {took:?}"
    );
    assert_eq!(status.message(), "deadline exceeded");
    lock.rollback().await.unwrap();
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn one_call_over_the_concurrency_limit_is_refused_at_once_with_resource_exhausted(
    pool: PgPool,
) {
    let users = seed(&pool, 5).await;
    let server = TestServer::start(context(&pool, |c| c.max_concurrent_calls = 2)).await;
    let lock = lock_users(&pool).await;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut client = server.client().await;
        let request = batch_request(
            vec![users[0].id],
            Strategy::BatchQuery,
            Some(Duration::from_secs(10)),
        );
        slow.push(tokio::spawn(async move {
            client.batch_get_users(request).await
        }));
    }
    // Let both calls reach the (blocked) database.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let status = server
        .client()
        .await
        .batch_get_users(batch_request(vec![users[0].id], Strategy::BatchQuery, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("retry with backoff"),
        "{}",
        status.message()
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refusal took {:?}",
        started.elapsed()
    );
    lock.rollback().await.unwrap();
    for call in slow {
        assert!(
            call.await.unwrap().is_ok(),
            "a call within the limit failed"
        );
    }
}

fn guard(tweak: impl FnOnce(&mut Config)) -> CallGuard {
    let mut config = Config::default();
    tweak(&mut config);
    CallGuard::new(&config)
}

const INFO: CallInfo = CallInfo {
    method: "/user.v1.UserService/BatchGetUsers",
    strategy: "STRATEGY_MAPREDUCE",
    batch_size: 3,
};

#[tokio::test]
async fn a_panicking_handler_becomes_internal_and_the_next_call_is_served() {
    let guard = guard(|c| c.max_concurrent_calls = 1);
    let start = tokio::time::Instant::now();
    let status = guard
        .run::<()>(INFO, start, async {
            panic!("secret detail at src/logic.rs:42")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(status.message(), "internal error");
    // The only slot was released by the panicking call.
    let served = guard.run(INFO, start, async { Ok::<_, Error>(7) }).await;
    assert_eq!(served.unwrap(), 7);
}

/// Collects what a tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::Write::write(&mut *self.0.lock().unwrap(), buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn slow_calls_are_logged_with_method_strategy_batch_size_and_duration() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let guard = guard(|c| c.slow_call = Duration::from_millis(50));

    let start = tokio::time::Instant::now();
    guard
        .run(INFO, start, async { Ok::<_, Error>(()) })
        .await
        .unwrap();
    assert!(!String::from_utf8_lossy(&captured.0.lock().unwrap()).contains("slow call"));

    guard
        .run(INFO, tokio::time::Instant::now(), async {
            tokio::time::sleep(Duration::from_millis(60)).await;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(log.contains("WARN") && log.contains("slow call"), "{log}");
    for field in [
        "method=\"/user.v1.UserService/BatchGetUsers\"",
        "strategy=\"STRATEGY_MAPREDUCE\"",
        "batch_size=3",
        "duration_ms=",
    ] {
        assert!(log.contains(field), "{field} missing from {log}");
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn metrics_and_healthz_are_served_on_the_admin_port(pool: PgPool) {
    let users = seed(&pool, 3).await;
    let server = TestServer::start(context(&pool, |c| {
        c.health_check_interval = Duration::from_millis(50)
    }))
    .await;
    let mut client = server.client().await;
    client
        .batch_get_users(batch_request(
            vec![users[0].id, users[1].id],
            Strategy::Mapreduce,
            None,
        ))
        .await
        .unwrap();
    let missing = client
        .batch_get_users(batch_request(
            vec![users[2].id + 100],
            Strategy::Errgroup,
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let (status, body) = http_get(server.admin, "/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        r#"rpc_server_requests_duration_ms_bucket{method="/user.v1.UserService/BatchGetUsers",strategy="STRATEGY_MAPREDUCE",le="1"}"#,
        r#"rpc_server_requests_duration_ms_bucket{method="/user.v1.UserService/BatchGetUsers",strategy="STRATEGY_MAPREDUCE",le="5000"}"#,
        r#"rpc_server_requests_code_total{method="/user.v1.UserService/BatchGetUsers",strategy="STRATEGY_MAPREDUCE",code="0"}"#,
        r#"rpc_server_requests_code_total{method="/user.v1.UserService/BatchGetUsers",strategy="STRATEGY_ERRGROUP",code="5"}"#,
        r#"user_rpc_ids_fetched_total{strategy="STRATEGY_MAPREDUCE"}"#,
        "user_rpc_db_pool_connections",
        "user_rpc_db_pool_idle_connections",
        "user_rpc_db_pool_max_connections ",
        "user_rpc_db_stash_idle_connections ",
        "user_rpc_db_waiting_lookups ",
    ] {
        assert!(
            body.contains(expected),
            "{expected} missing from /metrics:\n{body}"
        );
    }

    let until = Instant::now() + Duration::from_secs(5);
    let mut health = http_get(server.admin, "/healthz").await;
    while health.0 != 200 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        health = http_get(server.admin, "/healthz").await;
    }
    assert_eq!(health, (200, "ok\n".to_string()));
    assert_eq!(http_get(server.admin, "/nope").await.0, 404);
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn healthz_is_503_while_the_database_is_unreachable(pool: PgPool) {
    let unreachable = unreachable_pool(&pool);
    let svc = user_rpc::svc::ServiceContext::new(
        Config {
            health_check_interval: Duration::from_millis(50),
            ..Default::default()
        },
        unreachable,
    );
    let server = TestServer::start(svc).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        http_get(server.admin, "/healthz").await,
        (503, "database unreachable\n".to_string())
    );
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn shutdown_lets_in_flight_calls_finish_within_the_grace_period(pool: PgPool) {
    let users = seed(&pool, 2).await;
    let server = TestServer::start(context(&pool, |c| {
        c.shutdown_grace = Duration::from_secs(5)
    }))
    .await;
    let mut client = server.client().await;
    let lock = lock_users(&pool).await;
    let request = batch_request(
        vec![users[0].id],
        Strategy::BatchQuery,
        Some(Duration::from_secs(5)),
    );
    let in_flight = tokio::spawn(async move { client.batch_get_users(request).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    lock.rollback().await.unwrap();
    let answer = in_flight.await.unwrap();
    assert!(answer.is_ok(), "the in-flight call was cut off: {answer:?}");
    stopping.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn shutdown_does_not_wait_past_the_grace_period(pool: PgPool) {
    let users = seed(&pool, 2).await;
    let server = TestServer::start(context(&pool, |c| {
        c.shutdown_grace = Duration::from_millis(300);
        c.timeout = Duration::from_secs(30);
    }))
    .await;
    let mut client = server.client().await;
    let lock = lock_users(&pool).await;
    let request = batch_request(vec![users[0].id], Strategy::Errgroup, None);
    let in_flight = tokio::spawn(async move { client.batch_get_users(request).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    server.stop().await.unwrap();
    let took = started.elapsed();
    // 300 ms of grace, then at most 1 s each for the admin listener and the pool.
    assert!(took < Duration::from_millis(2500), "shutdown took {took:?}");
    lock.rollback().await.unwrap();
    in_flight.abort();
}
