//! Security basics: no SQL is built from strings, and the service runs with the least privilege
//! it needs (`etc/postgres/roles.sql`), checked on a private PostgreSQL server so that the roles
//! touch nothing else: the owner role migrates and seeds, the app role serves every strategy,
//! cancels its own abandoned queries, and can do nothing more. (TLS: `tls.rs`.)

use std::time::Duration;

use sqlx::{Connection as _, Executor as _};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use user_rpc::config::Config;
use user_rpc::server::Application;
use user_rpc::svc::ServiceContext;

use crate::private_pg::PrivatePostgres;
use crate::support::{
    STRATEGIES, call_within, lock_users_on, lookups_left_after, raw_client, seed,
};

const ROLES_SQL: &str = include_str!("../../etc/postgres/roles.sql");

fn as_role(pg: &PrivatePostgres, role: &str) -> String {
    pg.url("user_rpc")
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1)
}

/// The SQLSTATE of a statement the app role runs, if it fails.
async fn refused(conn: &mut sqlx::PgConnection, sql: &'static str) -> Option<String> {
    conn.execute(sql).await.err().and_then(|err| {
        err.as_database_error()
            .and_then(|db| db.code())
            .map(Into::into)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_serves_every_strategy_and_can_do_nothing_else() {
    let pg = PrivatePostgres::start().await;
    let mut superuser = sqlx::PgConnection::connect(&pg.url("postgres"))
        .await
        .unwrap();
    superuser.execute("CREATE DATABASE user_rpc").await.unwrap();
    let mut setup = sqlx::PgConnection::connect(&pg.url("user_rpc"))
        .await
        .unwrap();
    sqlx::raw_sql(ROLES_SQL).execute(&mut setup).await.unwrap();

    // The owner migrates and seeds, as `user-rpc migrate` / `seed` would.
    let owner = ServiceContext::connect_lazy(Config {
        database_url: as_role(&pg, "user_rpc_owner"),
        ..Config::default()
    })
    .unwrap();
    user_rpc::svc::prepare(&owner).await.unwrap();
    let users = seed(&owner.pool, 30).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();

    // The service runs as the app role. It starts as `serve` does, migrations on: the schema is
    // current, which a read tells, so it needs no right to change it.
    let config = Config {
        database_url: as_role(&pg, "user_rpc_app"),
        timeout: Duration::from_secs(30),
        ..Config::default()
    };
    let any = "127.0.0.1:0".parse().unwrap();
    let app = Application::build(config, any, any, false).await.unwrap();
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let started = std::time::Instant::now();
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map(|r| r.into_inner().status());
        if matches!(status, Ok(ServingStatus::Serving)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never SERVING as user_rpc_app: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = raw_client(addr);
    for strategy in STRATEGIES {
        let answer = call_within(&mut client, &ids, strategy, Duration::from_secs(5))
            .await
            .unwrap_or_else(|s| panic!("{strategy:?} as user_rpc_app: {s:?}"));
        assert_eq!(answer.users.len(), 30, "{strategy:?}");
    }

    // A call that times out behind a lock: the app role may cancel its own queries.
    let mut locker = sqlx::PgConnection::connect(&as_role(&pg, "user_rpc_owner"))
        .await
        .unwrap();
    lock_users_on(&mut locker).await;
    let status = call_within(
        &mut client,
        &ids,
        user_rpc::pb::Strategy::Mapreduce,
        Duration::from_millis(100),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let left = lookups_left_after(&mut setup, Duration::from_secs(2)).await;
    assert_eq!(
        left, 0,
        "the app role could not cancel its abandoned queries"
    );
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();

    // Nothing beyond reading users.
    let mut app_conn = sqlx::PgConnection::connect(&as_role(&pg, "user_rpc_app"))
        .await
        .unwrap();
    for sql in [
        "INSERT INTO users (name, email) VALUES ('x', 'x@example.com')",
        "UPDATE users SET name = 'x'",
        "DELETE FROM users",
        "CREATE TABLE stolen (id int)",
        "DROP TABLE users",
    ] {
        assert_eq!(
            refused(&mut app_conn, sql).await.as_deref(),
            Some("42501"),
            "user_rpc_app may run: {sql}"
        );
    }
    // Where the schema is behind, the app role cannot migrate, and says what to do.
    superuser
        .execute("CREATE DATABASE user_rpc_behind")
        .await
        .unwrap();
    let behind = ServiceContext::connect_lazy(Config {
        database_url: pg.url("user_rpc_behind").replacen(
            "postgres://postgres@",
            "postgres://user_rpc_app@",
            1,
        ),
        ..Config::default()
    })
    .unwrap();
    let err = format!("{:#}", user_rpc::svc::prepare(&behind).await.unwrap_err());
    assert!(
        err.contains("run `user-rpc migrate` as the schema owner"),
        "no hint: {err}"
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), served).await;
}

/// sqlx 0.9 accepts only `&'static str` as SQL unless wrapped in `AssertSqlSafe`, so text built
/// at run time cannot reach PostgreSQL by accident; this keeps the service from doing it on
/// purpose. Every value travels as a bind parameter.
#[test]
fn no_sql_is_built_from_strings_in_the_service() {
    fn visit(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for marker in ["AssertSqlSafe", "raw_sql"] {
                    if text.contains(marker) {
                        found.push(format!("{}: {marker}", path.display()));
                    }
                }
            }
        }
    }
    let mut found = Vec::new();
    visit(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut found,
    );
    assert!(found.is_empty(), "SQL built at run time: {found:?}");
}
