//! Faults, over a real socket: a slow database, a client that gives up mid-batch, ten times more
//! calls than connections, and the database restarted (or crashed) under load on a private
//! PostgreSQL server. Each scenario ends by checking that nothing is left behind
//! ([`Baseline::assert_nothing_leaked`]); each measured figure is in its assertion message.
//!
//! Deadlines are sent as `grpc-timeout` over a plain HTTP/2 client ([`raw_client`]): tonic's
//! `Channel` would enforce them itself and report CANCELLED, hiding the server's
//! DEADLINE_EXCEEDED (which fails without `server::call::CallStartLayer`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Connection as _, PgPool};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use user_rpc::config::Config;
use user_rpc::model::User;
use user_rpc::pb::{self, Strategy};
use user_rpc::svc::ServiceContext;

use crate::private_pg::PrivatePostgres;
use crate::support::{
    Baseline, RawClient, STRATEGIES, TestServer, call_within, context, heal, hook_lookups,
    lock_users_on, lookups, lookups_left_after, pids, raw_client, request_within, seed, small_pool,
};

/// [`call_within`], given up on 3 s after its deadline: `None` means the call hung.
async fn call_or_hang(
    client: &mut RawClient,
    ids: &[i64],
    strategy: Strategy,
    deadline: Duration,
) -> Option<Result<pb::BatchGetUsersResponse, tonic::Status>> {
    tokio::time::timeout(
        deadline + Duration::from_secs(3),
        call_within(client, ids, strategy, deadline),
    )
    .await
    .ok()
}

/// A warm-up call per strategy, so the client's connection and the pool exist before the
/// baseline is taken.
async fn warm_up(client: &mut RawClient, ids: &[i64]) {
    for strategy in STRATEGIES {
        call_within(client, ids, strategy, Duration::from_secs(5))
            .await
            .unwrap();
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_100ms_deadline_on_a_locked_table_ends_in_about_100ms_and_leaves_no_query_behind(
    pool: PgPool,
) {
    let users = seed(&pool, 40).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let svc = context(&pool, |c| c.timeout = Duration::from_secs(30));
    let server = TestServer::start(svc.clone()).await;
    let mut client = raw_client(server.addr);
    let options = pool.connect_options();
    let mut observer = sqlx::PgConnection::connect_with(&options).await.unwrap();
    let mut locker = sqlx::PgConnection::connect_with(&options).await.unwrap();
    let own = pids(&mut [&mut locker]).await;
    warm_up(&mut client, &ids).await;
    let baseline = Baseline::now();

    for strategy in STRATEGIES {
        lock_users_on(&mut locker).await;
        let started = Instant::now();
        let status = call_within(&mut client, &ids, strategy, Duration::from_millis(100))
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "{strategy:?}: {status:?}"
        );
        assert_eq!(status.message(), "deadline exceeded");
        assert!(
            took >= Duration::from_millis(95) && took < Duration::from_millis(350),
            "{strategy:?}: a 100 ms deadline answered after {took:?}"
        );
        println!("{strategy:?}: a 100 ms deadline answered DEADLINE_EXCEEDED after {took:?}");
        // The lock is still held: only a cancel can have ended the call's queries.
        let left = lookups_left_after(&mut observer, Duration::from_secs(2)).await;
        assert_eq!(
            left, 0,
            "{strategy:?}: {left} queries of the timed-out call still in PostgreSQL"
        );
        sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
        baseline
            .assert_nothing_leaked(&svc, &mut observer, &own, &format!("{strategy:?} deadline"))
            .await;
        let again = call_within(&mut client, &ids, strategy, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(again.users.len(), 40, "{strategy:?}");
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_client_that_gives_up_mid_batch_stops_the_batchs_lookups(pool: PgPool) {
    let users = seed(&pool, 1000).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    // The service's own pool: the test's (which hooks and counts the lookups) stays free.
    let service_pool = small_pool(&pool, 20, Duration::from_secs(1)).await;
    let svc = ServiceContext::new(
        Config {
            timeout: Duration::from_secs(30),
            ..Config::default()
        },
        service_pool,
    );
    let server = TestServer::start(svc.clone()).await;
    let mut client = server.client().await;
    let mut observer = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    warm_up(&mut raw_client(server.addr), &ids[..10]).await;
    let baseline = Baseline::now();

    for strategy in [Strategy::Errgroup, Strategy::Mapreduce] {
        // 20 ms per lookup: the whole batch would take over a second.
        hook_lookups(&pool, None, Duration::from_millis(20)).await;
        let call = client.batch_get_users(pb::BatchGetUsersRequest {
            ids: ids.clone(),
            strategy: strategy.into(),
            allow_missing: false,
        });
        // The client gives up after 150 ms: dropping the call resets its HTTP/2 stream.
        let gave_up = tokio::time::timeout(Duration::from_millis(150), call).await;
        assert!(gave_up.is_err(), "{strategy:?}: the batch finished early");
        let at_cancel = Instant::now();
        let left = lookups_left_after(&mut observer, Duration::from_secs(2)).await;
        let ran = lookups(&pool).await;
        // Nothing more starts later on.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ran_later = lookups(&pool).await;
        heal(&pool).await;

        assert_eq!(
            left, 0,
            "{strategy:?}: queries still running after the cancel"
        );
        assert!(
            ran < 300,
            "{strategy:?}: {ran} of 1000 lookups ran for a call cancelled after 150 ms"
        );
        assert_eq!(
            ran,
            ran_later,
            "{strategy:?}: lookups went on starting {:?} after the client left",
            at_cancel.elapsed()
        );
        baseline
            .assert_nothing_leaked(&svc, &mut observer, &[], &format!("{strategy:?} cancel"))
            .await;
        println!("{strategy:?}: {ran} of 1000 lookups ran before the cancel stopped the batch");
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn ten_times_more_calls_than_connections_end_in_time_and_the_pool_recovers(pool: PgPool) {
    const CONNECTIONS: u32 = 4;
    const CALLS: usize = 40;
    let deadline = Duration::from_secs(2);
    let users = seed(&pool, 200).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let small = small_pool(&pool, CONNECTIONS, Duration::from_millis(300)).await;
    let mut config = Config {
        max_concurrent_calls: 24,
        timeout: Duration::from_secs(30),
        ..Config::default()
    };
    config.db_max_connections = CONNECTIONS;
    let svc = ServiceContext::new(config, small.clone());
    let server = TestServer::start(svc.clone()).await;
    let client = raw_client(server.addr);
    let mut observer = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    warm_up(&mut client.clone(), &ids[..10]).await;
    let own: Vec<i32> = Vec::new();
    let baseline = Baseline::now();
    // Every lookup holds its connection for 5 ms: the 4 connections cannot serve everyone.
    hook_lookups(&pool, None, Duration::from_millis(5)).await;

    let calls = (0..CALLS).map(|i| {
        let mut client = client.clone();
        let ids = ids[(i * 3) % 150..][..50].to_vec();
        let strategy = STRATEGIES[i % 3];
        tokio::spawn(async move {
            let started = Instant::now();
            let code = match call_or_hang(&mut client, &ids, strategy, deadline).await {
                None => None,
                Some(Ok(response)) => {
                    assert_eq!(response.users.len(), 50);
                    Some(Code::Ok)
                }
                Some(Err(status)) => Some(status.code()),
            };
            (strategy, code, started.elapsed())
        })
    });
    let outcomes = futures_util::future::join_all(calls).await;
    // Wait for cancelled lookups to leave, then count what the database did.
    let _ = lookups_left_after(&mut observer, Duration::from_secs(2)).await;
    let ran = lookups(&pool).await;
    heal(&pool).await;

    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    for outcome in outcomes {
        let (strategy, code, took) = outcome.unwrap();
        *by_code.entry(format!("{code:?}")).or_default() += 1;
        slowest = slowest.max(took);
        assert!(
            matches!(
                code,
                Some(Code::Ok | Code::ResourceExhausted | Code::Unavailable)
            ),
            "{strategy:?} ended with {code:?} after {took:?}"
        );
        assert!(
            took < deadline + Duration::from_millis(250),
            "{strategy:?} took {took:?} with a {deadline:?} deadline"
        );
    }
    // The database has about five times less time than the admitted calls ask for: how many
    // succeed is bounded by what it can do within the acquire timeout. What matters is that its
    // work is not wasted on calls that fail anyway: a lookup that has waited 50 ms gets the next
    // connection before any newcomer (when newcomers could always take connections first, only
    // 46-56% of the lookups served calls that succeeded, and 3-4 calls did).
    let ok = by_code.get("Some(Ok)").copied().unwrap_or(0);
    let useful = ok as f64 * 50.0 / ran.max(1) as f64;
    println!(
        "{CALLS} calls on {CONNECTIONS} connections: {by_code:?}, slowest {slowest:?}; \
         {ran} lookups ran, {:.0}% of them for calls that succeeded",
        useful * 100.0
    );
    assert!(ok > 0, "no call succeeded: {by_code:?}");
    assert!(
        useful >= 0.8,
        "only {:.0}% of {ran} lookups served calls that succeeded ({by_code:?})",
        useful * 100.0
    );

    baseline
        .assert_nothing_leaked(&svc, &mut observer, &own, "pool exhaustion")
        .await;
    for strategy in STRATEGIES {
        let again = client
            .clone()
            .batch_get_users(request_within(ids.clone(), strategy, deadline))
            .await
            .unwrap_or_else(|s| panic!("{strategy:?} after the storm: {s:?}"));
        assert_eq!(again.into_inner().users.len(), 200);
    }
    assert!(
        small.size() <= CONNECTIONS,
        "the pool grew past its maximum"
    );
}

/// One call of the restart scenario.
struct Call {
    strategy: Strategy,
    /// When it started, from the start of the load.
    at: Duration,
    took: Duration,
    /// `None`: no answer within the deadline and a generous margin (it hung).
    code: Option<Code>,
}

/// Calls BatchGetUsers with `strategy` in a loop, 20 random known ids at a time, until `stop`.
async fn load(
    mut client: RawClient,
    strategy: Strategy,
    users: Arc<Vec<User>>,
    start: Instant,
    deadline: Duration,
    stop: CancellationToken,
) -> Vec<Call> {
    let mut calls = Vec::new();
    while !stop.is_cancelled() {
        let from = rand::random_range(0..users.len() - 20);
        let wanted = &users[from..from + 20];
        let ids: Vec<i64> = wanted.iter().map(|u| u.id).collect();
        let at = start.elapsed();
        let code = match call_or_hang(&mut client, &ids, strategy, deadline).await {
            None => None,
            Some(Ok(response)) => {
                let got = response.users;
                let right = got.len() == wanted.len()
                    && got
                        .iter()
                        .zip(wanted)
                        .all(|(g, w)| g.id == w.id && g.name == w.name && g.email == w.email);
                assert!(right, "{strategy:?} answered wrong users");
                Some(Code::Ok)
            }
            Some(Err(status)) => {
                assert!(
                    !status.message().contains("SELECT") && !status.message().contains(".rs"),
                    "{strategy:?} leaked internals: {status:?}"
                );
                Some(status.code())
            }
        };
        calls.push(Call {
            strategy,
            at,
            took: start.elapsed() - at,
            code,
        });
        if code != Some(Code::Ok) {
            // A client backs off a little on errors.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    calls
}

async fn health(
    channel: tonic::transport::Channel,
) -> tonic_health::pb::health_check_response::ServingStatus {
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status())
        .unwrap_or(tonic_health::pb::health_check_response::ServingStatus::Unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarted_or_crashed_under_load_fails_fast_and_recovers_by_itself() {
    use tonic_health::pb::health_check_response::ServingStatus;
    const CONNECTIONS: u32 = 10;
    let deadline = Duration::from_secs(1);
    let mut pg = PrivatePostgres::start().await;
    let config = Config {
        database_url: pg.url("user_rpc"),
        db_max_connections: CONNECTIONS,
        db_acquire_timeout: Duration::from_millis(500),
        health_check_interval: Duration::from_millis(100),
        ..Config::default()
    };
    let svc = ServiceContext::connect_lazy(config).unwrap();
    user_rpc::svc::prepare(&svc).await.unwrap();
    let users = Arc::new(seed(&svc.pool, 500).await);
    let server = TestServer::start(svc.clone()).await;
    let channel = server.channel().await;
    let client = raw_client(server.addr);
    warm_up(
        &mut client.clone(),
        &users[..20].iter().map(|u| u.id).collect::<Vec<_>>(),
    )
    .await;
    let mut observer = sqlx::PgConnection::connect(&pg.url("user_rpc"))
        .await
        .unwrap();
    let baseline = Baseline::now();

    for crash in [false, true] {
        let scenario = if crash { "crash" } else { "restart" };
        let start = Instant::now();
        let stop = CancellationToken::new();
        let loads: Vec<_> = STRATEGIES
            .iter()
            .flat_map(|&strategy| [strategy, strategy])
            .map(|strategy| {
                tokio::spawn(load(
                    client.clone(),
                    strategy,
                    Arc::clone(&users),
                    start,
                    deadline,
                    stop.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        drop(observer);
        if crash {
            pg.kill().await;
        } else {
            pg.stop().await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let down = health(channel.clone()).await;
        pg.restart().await;
        let up_at = start.elapsed();
        let mut serving_after = None;
        while start.elapsed() < up_at + Duration::from_secs(8) {
            if health(channel.clone()).await == ServingStatus::Serving {
                serving_after = Some(start.elapsed() - up_at);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.cancel();
        let mut calls = Vec::new();
        for load in loads {
            calls.extend(load.await.expect("a load task panicked"));
        }

        assert_eq!(
            down,
            ServingStatus::NotServing,
            "{scenario}: health during the outage"
        );
        let serving_after =
            serving_after.unwrap_or_else(|| panic!("{scenario}: never SERVING again"));
        let mut summary = String::new();
        for strategy in STRATEGIES {
            let mine: Vec<&Call> = calls.iter().filter(|c| c.strategy == strategy).collect();
            let failed: Vec<&&Call> = mine.iter().filter(|c| c.code != Some(Code::Ok)).collect();
            let hung = mine.iter().filter(|c| c.code.is_none()).count();
            let slowest = mine.iter().map(|c| c.took).max().unwrap_or_default();
            let wrong: Vec<String> = failed
                .iter()
                .filter(|c| c.code != Some(Code::Unavailable))
                .map(|c| format!("{:?} at {:?}", c.code, c.at))
                .collect();
            // Calls that started once the database accepted connections again: only a dead
            // connection can fail them, and each may fail at most the one call that finds it.
            let after_restart = failed.iter().filter(|c| c.at >= up_at).count();
            let recovered = mine
                .iter()
                .filter(|c| c.at >= up_at && c.code == Some(Code::Ok))
                .map(|c| c.at + c.took - up_at)
                .min();
            let during = failed.len() - after_restart;
            let line = format!(
                "{scenario} {strategy:?}: {} calls, {during} failed during the outage (all \
                 UNAVAILABLE: {}), {after_restart} failed after the restart, first success \
                 {recovered:?} after the restart, slowest call {slowest:?}, {hung} hung",
                mine.len(),
                wrong.is_empty(),
            );
            summary.push_str(&line);
            summary.push('\n');
            assert!(wrong.is_empty(), "{line}; not UNAVAILABLE: {wrong:?}");
            assert_eq!(hung, 0, "{line}");
            assert!(slowest < deadline + Duration::from_millis(300), "{line}");
            assert!(during > 0, "{line}: the outage was not seen");
            assert!(after_restart <= CONNECTIONS as usize, "{line}");
            let recovered = recovered.unwrap_or_else(|| panic!("{line}: never recovered"));
            assert!(recovered < Duration::from_secs(3), "{line}");
            // Once recovered, every later call succeeds with the right users (checked in load).
            let late_failures = failed
                .iter()
                .filter(|c| c.at > up_at + recovered + Duration::from_millis(100))
                .count();
            assert_eq!(late_failures, 0, "{line}");
        }
        println!("{summary}{scenario}: SERVING {serving_after:?} after the restart");

        observer = sqlx::PgConnection::connect(&pg.url("user_rpc"))
            .await
            .unwrap();
        baseline
            .assert_nothing_leaked(&svc, &mut observer, &[], scenario)
            .await;
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_without_the_database_and_turns_serving_when_it_appears() {
    use tonic_health::pb::health_check_response::ServingStatus;
    // The database's server exists but is down: its port refuses connections.
    let mut pg = PrivatePostgres::start().await;
    pg.stop().await;
    let config = Config {
        database_url: pg.url("user_rpc"),
        db_acquire_timeout: Duration::from_millis(500),
        health_check_interval: Duration::from_millis(100),
        ..Config::default()
    };
    let svc = ServiceContext::connect_lazy(config).unwrap();
    let any = "127.0.0.1:0".parse().unwrap();
    let app = tokio::time::timeout(
        Duration::from_secs(2),
        user_rpc::server::Application::bind(svc.clone(), any, any),
    )
    .await
    .expect("bind waited for the database")
    .expect("bind failed without the database")
    .preparing_database(true);
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = raw_client(addr);
    assert_eq!(health(channel.clone()).await, ServingStatus::NotServing);

    // Calls fail fast with UNAVAILABLE, well before their deadline.
    let started = Instant::now();
    let status = call_within(
        &mut client,
        &[1],
        Strategy::BatchQuery,
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        took < Duration::from_millis(1500),
        "UNAVAILABLE after {took:?} with a 2 s deadline"
    );
    let baseline = Baseline::now();

    // The database appears; the server creates it, migrates, and turns SERVING by itself.
    pg.restart().await;
    let appeared = Instant::now();
    while health(channel.clone()).await != ServingStatus::Serving {
        assert!(
            appeared.elapsed() < Duration::from_secs(10),
            "not SERVING {:?} after the database appeared",
            appeared.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = appeared.elapsed();
    let mut request = request_within(vec![1], Strategy::BatchQuery, Duration::from_secs(2));
    request.get_mut().allow_missing = true;
    let answer = client
        .batch_get_users(request)
        .await
        .unwrap_or_else(|s| panic!("a call {recovered:?} after SERVING failed: {s:?}"))
        .into_inner();
    assert_eq!(answer.missing_ids, vec![1], "the migrated table is empty");
    println!(
        "UNAVAILABLE after {took:?} while down; SERVING {recovered:?} after the database appeared"
    );

    let mut observer = sqlx::PgConnection::connect(&pg.url("user_rpc"))
        .await
        .unwrap();
    baseline
        .assert_nothing_leaked(&svc, &mut observer, &[], "database down at start-up")
        .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), served).await;
}
