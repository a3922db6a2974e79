//! The load generator behind `user-rpc bench`, against a real server.

use std::time::Duration;

use sqlx::PgPool;
use user_rpc::loadgen::{LoadOptions, run, table};

use crate::support::{STRATEGIES, TestServer, context, seed};

fn options(addr: String, max_id: i64, missing_ratio: f64) -> LoadOptions {
    LoadOptions {
        addr,
        ca_cert: None,
        concurrency: 4,
        duration: Duration::from_secs(30),
        // Not a multiple of the callers: the split must still add up.
        requests: Some(41),
        batch: 10,
        max_id,
        missing_ratio,
        strategies: STRATEGIES.to_vec(),
        timeout: Duration::from_secs(5),
        progress: false,
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn every_strategy_gets_its_requests_users_and_percentiles(pool: PgPool) {
    let users = seed(&pool, 50).await;
    let server = TestServer::start(context(&pool, |_| {})).await;
    let max_id = users.last().unwrap().id;
    let reports = run(&options(server.url(), max_id, 0.0)).await.unwrap();
    assert_eq!(reports.len(), 3);
    for (report, strategy) in reports.iter().zip(STRATEGIES) {
        assert_eq!(report.strategy, strategy.as_str_name());
        assert_eq!(report.requests, 41, "{report:?}");
        assert!(report.errors.is_empty(), "{report:?}");
        // Random ids repeat within a batch, and duplicates are returned once.
        assert!(report.users > 41 && report.users <= 410, "{report:?}");
        assert!(
            report.p50_ms > 0.0 && report.p50_ms <= report.p90_ms,
            "{report:?}"
        );
        assert!(
            report.p90_ms <= report.p99_ms && report.p99_ms <= report.max_ms,
            "{report:?}"
        );
        assert!(report.users_per_second > 0.0);
    }
    let printed = table(&reports);
    assert!(
        printed.contains("STRATEGY_BATCH_QUERY") && printed.contains("users/s"),
        "{printed}"
    );
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_missing_ratio_asks_for_ids_that_do_not_exist(pool: PgPool) {
    let users = seed(&pool, 50).await;
    let server = TestServer::start(context(&pool, |_| {})).await;
    let max_id = users.last().unwrap().id;
    let mut all_missing = options(server.url(), max_id, 1.0);
    all_missing.strategies.truncate(1);
    let report = &run(&all_missing).await.unwrap()[0];
    assert_eq!(report.users, 0, "{report:?}");
    assert!(
        report.errors.is_empty(),
        "missing ids are allowed, not errors: {report:?}"
    );
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn errors_are_counted_by_status_code(pool: PgPool) {
    let server = TestServer::start(context(&pool, |c| c.max_batch = 5)).await;
    // Batches of 10 exceed the server's max_batch of 5: every call is INVALID_ARGUMENT.
    let mut too_big = options(server.url(), 100, 0.0);
    too_big.strategies.truncate(1);
    too_big.requests = Some(8);
    let report = &run(&too_big).await.unwrap()[0];
    assert_eq!(report.errors.get("InvalidArgument"), Some(&8), "{report:?}");
}
