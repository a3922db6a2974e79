//! BatchGetUsers and GetUser against a real PostgreSQL, every rule for every strategy, through
//! the logic layer (the transport is covered by `e2e`).

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sqlx::{Connection as _, PgPool};
use tonic::Code;
use user_rpc::error::Error;
use user_rpc::logic::{GetUserLogic, RequestContext};
use user_rpc::pb::{self, Strategy};

use crate::support::{
    STRATEGIES, batch, batch_within, context, heal, lock_users, lock_users_on, lookups, poison,
    seed, small_pool, waiting_lookups,
};

fn ids_of(response: &pb::BatchGetUsersResponse) -> Vec<i64> {
    response.users.iter().map(|u| u.id).collect()
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn users_come_back_in_request_order_with_duplicates_fetched_once(pool: PgPool) {
    let users = seed(&pool, 20).await;
    let svc = context(&pool, |_| {});
    let (a, b, c) = (users[5].id, users[1].id, users[9].id);
    for strategy in STRATEGIES {
        let response = batch(&svc, vec![a, b, a, c, b], strategy, false)
            .await
            .unwrap();
        assert_eq!(ids_of(&response), vec![a, b, c], "{strategy:?}");
        assert_eq!(response.strategy(), strategy);
        assert!(response.missing_ids.is_empty());
        let first = &response.users[0];
        assert_eq!(
            (first.name.as_str(), first.email.as_str()),
            ("User 5", "user5@example.com")
        );
        let created = first.create_time.expect("create_time is set");
        assert_eq!(created.seconds, users[5].created_at.timestamp());
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn missing_ids_fail_the_batch_with_not_found_naming_them(pool: PgPool) {
    let users = seed(&pool, 3).await;
    let svc = context(&pool, |_| {});
    let absent = [users[2].id + 100, users[2].id + 7];
    for strategy in STRATEGIES {
        let err = batch(
            &svc,
            vec![users[0].id, absent[0], absent[1]],
            strategy,
            false,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{strategy:?}");
        assert!(
            matches!(&err, Error::NotFound(ids) if ids == &absent),
            "{strategy:?}: {err}"
        );
        assert!(err.to_string().contains(&absent[0].to_string()), "{err}");
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn allow_missing_returns_found_users_and_missing_ids_in_request_order(pool: PgPool) {
    let users = seed(&pool, 3).await;
    let svc = context(&pool, |_| {});
    let (x, y) = (users[2].id + 50, users[2].id + 10);
    for strategy in STRATEGIES {
        let response = batch(
            &svc,
            vec![x, users[1].id, y, x, users[0].id],
            strategy,
            true,
        )
        .await
        .unwrap();
        assert_eq!(
            ids_of(&response),
            vec![users[1].id, users[0].id],
            "{strategy:?}"
        );
        assert_eq!(response.missing_ids, vec![x, y], "{strategy:?}");
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn bad_batches_are_invalid_argument_naming_the_field(pool: PgPool) {
    let svc = context(&pool, |c| c.max_batch = 5);
    let cases: [(Vec<i64>, &str, &str); 4] = [
        (vec![], "ids", "must contain at least 1 id"),
        (vec![1; 6], "ids", "must contain at most 5 ids, got 6"),
        (vec![1, 0], "ids[1]", "must be > 0, got 0"),
        (vec![-7, 2], "ids[0]", "must be > 0, got -7"),
    ];
    for strategy in STRATEGIES {
        for (ids, field, description) in &cases {
            let err = batch(&svc, ids.clone(), strategy, false).await.unwrap_err();
            let Error::InvalidArgument(violations) = &err else {
                panic!("{strategy:?} {ids:?}: expected INVALID_ARGUMENT, got {err}");
            };
            assert_eq!(violations[0].field, *field, "{ids:?}");
            assert_eq!(violations[0].description, *description, "{ids:?}");
        }
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn an_unknown_strategy_number_is_invalid_argument(pool: PgPool) {
    let svc = context(&pool, |_| {});
    let ctx = RequestContext::with_timeout(std::time::Duration::from_secs(5));
    let err = user_rpc::logic::BatchGetUsersLogic::new(ctx, &svc)
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![1],
            strategy: 42,
            allow_missing: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.to_string().contains("unknown strategy 42"), "{err}");
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn unspecified_runs_the_configured_default_and_says_so(pool: PgPool) {
    let users = seed(&pool, 2).await;
    for default in STRATEGIES {
        let svc = context(&pool, |c| c.default_strategy = default);
        let response = batch(&svc, vec![users[0].id], Strategy::Unspecified, false)
            .await
            .unwrap();
        assert_eq!(response.strategy(), default);
        assert_eq!(ids_of(&response), vec![users[0].id]);
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn batch_query_splits_large_batches_into_chunks(pool: PgPool) {
    let users = seed(&pool, 10).await;
    let svc = context(&pool, |c| c.batch_query_chunk = 3);
    let ids: Vec<i64> = users.iter().rev().map(|u| u.id).collect();
    let response = batch(&svc, ids.clone(), Strategy::BatchQuery, false)
        .await
        .unwrap();
    assert_eq!(ids_of(&response), ids);
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn every_strategy_returns_the_same_answer_for_random_batches(pool: PgPool) {
    let users = seed(&pool, 200).await;
    let max_id = users.last().unwrap().id;
    let svc = context(&pool, |c| c.workers = 7);
    for seed_value in 0..40_u64 {
        let mut rng = StdRng::seed_from_u64(seed_value);
        let len = rng.random_range(1..=120);
        // Ids up to 20% past the last user: a mix of present, missing and repeated ids.
        let ids: Vec<i64> = (0..len)
            .map(|_| rng.random_range(1..=max_id + max_id / 5))
            .collect();
        let allow_missing = rng.random_bool(0.7);
        let mut answers = Vec::new();
        for strategy in STRATEGIES {
            let answer = match batch(&svc, ids.clone(), strategy, allow_missing).await {
                Ok(mut response) => {
                    response.strategy = 0;
                    Ok(response)
                }
                Err(err) => Err((err.code(), err.to_string())),
            };
            answers.push((strategy, answer));
        }
        let (_, reference) = &answers[0];
        for (strategy, answer) in &answers[1..] {
            assert_eq!(
                answer, reference,
                "seed {seed_value}: {strategy:?} disagrees with ERRGROUP for {ids:?}"
            );
        }
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_database_error_mid_batch_stops_the_batch_and_leaves_the_pool_usable(pool: PgPool) {
    let users = seed(&pool, 200).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let svc = context(&pool, |c| c.workers = 4);
    for strategy in STRATEGIES {
        poison(&pool, ids[3]).await;
        let err = batch(&svc, ids.clone(), strategy, false).await.unwrap_err();
        let ran = lookups(&pool).await;
        heal(&pool).await;

        assert_eq!(err.code(), Code::Internal, "{strategy:?}: {err}");
        let status = tonic::Status::from(err);
        assert_eq!(
            status.message(),
            "internal error",
            "{strategy:?} leaked the cause"
        );
        if strategy != Strategy::BatchQuery {
            // 4 workers, the 4th id fails after ~5 ms: only lookups already running may finish.
            assert!(
                ran < 40,
                "{strategy:?}: {ran} of 200 lookups ran after the first error"
            );
        }
        let again = batch(&svc, ids.clone(), strategy, false).await.unwrap();
        assert_eq!(
            again.users.len(),
            200,
            "{strategy:?}: the pool is not usable afterwards"
        );
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn an_exhausted_pool_is_unavailable_and_recovers(pool: PgPool) {
    let users = seed(&pool, 5).await;
    let mut config = user_rpc::config::Config {
        db_max_connections: 1,
        db_acquire_timeout: std::time::Duration::from_millis(100),
        ..Default::default()
    };
    config.workers = 2;
    let ids = vec![users[0].id, users[1].id];
    for strategy in STRATEGIES {
        // A fresh one-connection pool per strategy: after its first query the service's
        // connection stash keeps that connection, so the test could not take it any more.
        let small = small_pool(&pool, 1, config.db_acquire_timeout).await;
        let svc = user_rpc::svc::ServiceContext::new(config.clone(), small.clone());
        let held = small.acquire().await.unwrap();
        let err = batch(&svc, ids.clone(), strategy, false).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{strategy:?}: {err}");
        let status = tonic::Status::from(err);
        assert!(status.message().contains("retry"), "{}", status.message());
        drop(held);
        let response = batch(&svc, ids.clone(), strategy, false).await.unwrap();
        assert_eq!(response.users.len(), 2, "{strategy:?} did not recover");
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn get_user_finds_one_and_reports_not_found_and_bad_ids(pool: PgPool) {
    let users = seed(&pool, 2).await;
    let svc = context(&pool, |_| {});
    let get = |id| {
        let svc = &svc;
        async move {
            let ctx = RequestContext::with_timeout(std::time::Duration::from_secs(5));
            GetUserLogic::new(ctx, svc)
                .get_user(pb::GetUserRequest { id })
                .await
        }
    };
    let user = get(users[1].id).await.unwrap();
    assert_eq!((user.id, user.name.as_str()), (users[1].id, "User 1"));
    assert_eq!(
        get(users[1].id + 1000).await.unwrap_err().code(),
        Code::NotFound
    );
    let err = get(0).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.to_string(), "invalid request: id: must be > 0, got 0");
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_blocked_database_hits_the_server_deadline_with_deadline_exceeded(pool: PgPool) {
    let users = seed(&pool, 50).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let svc = context(&pool, |_| {});
    // Another session holds an exclusive lock: every lookup of `users` waits behind it.
    let locker = lock_users(&pool).await;
    for strategy in STRATEGIES {
        let started = std::time::Instant::now();
        let err = batch_within(
            &svc,
            ids.clone(),
            strategy,
            false,
            std::time::Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{strategy:?}: {err}");
        assert!(
            took < std::time::Duration::from_millis(1000),
            "{strategy:?}: a 200 ms deadline took {took:?}"
        );
    }
    locker.rollback().await.unwrap();
    for strategy in STRATEGIES {
        let response = batch(&svc, ids.clone(), strategy, false).await.unwrap();
        assert_eq!(
            response.users.len(),
            50,
            "{strategy:?} did not recover after the lock"
        );
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_batch_with_more_workers_than_pool_connections_shares_them_without_stalling(
    pool: PgPool,
) {
    let users = seed(&pool, 200).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let config = user_rpc::config::Config {
        workers: 16,
        db_acquire_timeout: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let small = small_pool(&pool, 2, config.db_acquire_timeout).await;
    let svc = user_rpc::svc::ServiceContext::new(config, small);
    for strategy in [Strategy::Errgroup, Strategy::Mapreduce] {
        let started = std::time::Instant::now();
        let response = batch(&svc, ids.clone(), strategy, false).await.unwrap();
        let took = started.elapsed();
        assert_eq!(response.users.len(), 200, "{strategy:?}");
        // Waiting on connections the batch itself holds would end in the 2 s acquire timeout.
        assert!(
            took < std::time::Duration::from_secs(1),
            "{strategy:?} stalled for {took:?}"
        );
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_stashed_connection_that_died_costs_no_call(pool: PgPool) {
    let users = seed(&pool, 50).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let svc = context(&pool, |c| c.workers = 8);
    // Its own connection: the stash may hold every connection of the pool.
    let mut killer = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    for strategy in STRATEGIES {
        // Fill the stash with connections, then kill their backends, as a restart of the
        // server would.
        batch(&svc, ids.clone(), strategy, false).await.unwrap();
        assert!(svc.users.stashed() > 0, "nothing was stashed");
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
        )
        .fetch_one(&mut killer)
        .await
        .unwrap();
        assert!(killed > 0, "no backend to kill");
        // Every lookup that meets a dead connection retries once on a fresh one.
        for round in 0..3 {
            let response = batch(&svc, ids.clone(), strategy, false).await;
            assert!(
                response.is_ok(),
                "{strategy:?} round {round} failed after the kill: {:?}",
                response.err()
            );
        }
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_deadline_cancels_the_calls_queries_in_postgres(pool: PgPool) {
    let users = seed(&pool, 50).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let svc = context(&pool, |c| c.workers = 4);
    let mut observer = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    let mut locker = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    for strategy in STRATEGIES {
        lock_users_on(&mut locker).await;
        let err = batch_within(
            &svc,
            ids.clone(),
            strategy,
            false,
            std::time::Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{strategy:?}");
        // The lock is still held: only a cancel can have ended the queries.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut waiting = waiting_lookups(&mut observer).await;
        while waiting > 0 && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            waiting = waiting_lookups(&mut observer).await;
        }
        assert_eq!(
            waiting, 0,
            "{strategy:?}: queries of a timed-out call still wait in PostgreSQL"
        );
        sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
        let again = batch(&svc, ids.clone(), strategy, false).await.unwrap();
        assert_eq!(again.users.len(), 50, "{strategy:?} did not recover");
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_lookup_waiting_for_a_connection_gets_one_when_another_lookup_fails(pool: PgPool) {
    let users = seed(&pool, 3).await;
    let model = user_rpc::model::UserModel::new(
        small_pool(&pool, 1, std::time::Duration::from_secs(3)).await,
    );
    poison(&pool, users[0].id).await;
    // The failing lookup holds the only connection; the other waits for it. When the failure
    // hands that connection back to the pool, the waiter must take it at once, not time out.
    let started = std::time::Instant::now();
    let (failed, found) = tokio::join!(model.find_one(users[0].id), async {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        model.find_one(users[1].id).await
    });
    let took = started.elapsed();
    heal(&pool).await;
    assert!(failed.is_err(), "the poisoned row did not fail");
    assert_eq!(found.unwrap().map(|u| u.id), Some(users[1].id));
    assert!(
        took < std::time::Duration::from_secs(1),
        "the waiter slept until its timeout: {took:?}"
    );
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn lookups_waiting_for_a_connection_are_counted(pool: PgPool) {
    let users = seed(&pool, 2).await;
    let model = user_rpc::model::UserModel::new(
        small_pool(&pool, 1, std::time::Duration::from_secs(5)).await,
    );
    let mut locker = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    lock_users_on(&mut locker).await;
    // The first lookup holds the only connection (blocked on the lock); the second waits for it.
    let (first, second, observed) = tokio::join!(
        model.find_one(users[0].id),
        model.find_one(users[1].id),
        async {
            // By then the first lookup has its connection and waits on the lock.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let waiting = model.waiting();
            sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
            waiting
        }
    );
    assert_eq!(
        observed, 1,
        "one lookup waits while the other holds the only connection"
    );
    assert!(first.unwrap().is_some() && second.unwrap().is_some());
    assert_eq!(model.waiting(), 0);
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn a_returned_connection_goes_to_the_health_ping_then_the_longest_waiting_lookup(
    pool: PgPool,
) {
    use std::time::Duration;
    let users = seed(&pool, 4).await;
    let model = user_rpc::model::UserModel::new(small_pool(&pool, 1, Duration::from_secs(5)).await);
    let mut locker = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lookup = |name: &'static str, id: i64| {
        let model = model.clone();
        let order = std::sync::Arc::clone(&order);
        tokio::spawn(async move {
            model.find_one(id).await.unwrap().unwrap();
            order.lock().unwrap().push(name);
        })
    };
    // The only connection is busy behind a lock; two lookups and then the ping line up.
    lock_users_on(&mut locker).await;
    let mut tasks = vec![lookup("holder", users[0].id)];
    for (name, user) in [("first in line", &users[1]), ("second in line", &users[2])] {
        tokio::time::sleep(Duration::from_millis(50)).await;
        tasks.push(lookup(name, user.id));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ping = {
        let model = model.clone();
        let order = std::sync::Arc::clone(&order);
        tokio::spawn(async move {
            model.ping().await.unwrap();
            order.lock().unwrap().push("ping");
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        model.waiting(),
        3,
        "the lookups and the ping should be waiting"
    );
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    // Meanwhile more lookups arrive; they must not take a connection out of turn.
    for user in &users[3..] {
        tasks.push(lookup("late", user.id));
    }
    tasks.push(ping);
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        vec!["holder", "ping", "first in line", "second in line", "late"]
    );
}
