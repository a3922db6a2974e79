//! TLS on the gRPC listener (`tls_cert` / `tls_key`): real handshakes with a certificate made
//! for the test by a CA of its own, from tonic's client and from the real `grpcurl`.

use std::path::{Path, PathBuf};

use sqlx::PgPool;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use user_rpc::config::TlsFiles;
use user_rpc::pb::{self, user_service_client::UserServiceClient};
use user_rpc::server::Application;

use crate::e2e::grpcurl;
use crate::support::{TestServer, context, seed};

/// A CA and a certificate for `localhost` it signed, as PEM files in a fresh directory.
struct Pki {
    dir: PathBuf,
    ca: String,
    files: TlsFiles,
}

impl Pki {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "user-rpc-tls-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, issuer_key, issuer_params) = ca();
        let issuer = rcgen::Issuer::new(issuer_params, issuer_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let files = TlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), &ca).unwrap();
        Self { dir, ca, files }
    }

    fn ca_file(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed CA: its PEM certificate, key and parameters.
fn ca() -> (String, rcgen::KeyPair, rcgen::CertificateParams) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "user-rpc test CA");
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key, params)
}

fn endpoint(server: &TestServer, ca: &str) -> Endpoint {
    Endpoint::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
}

fn request(ids: Vec<i64>) -> pb::BatchGetUsersRequest {
    pb::BatchGetUsersRequest {
        ids,
        ..Default::default()
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn tls_serves_clients_that_trust_its_ca_and_no_one_else(pool: PgPool) {
    let users = seed(&pool, 3).await;
    let ids: Vec<i64> = users.iter().map(|u| u.id).collect();
    let pki = Pki::new();
    let files = pki.files.clone();
    let server = TestServer::start(context(&pool, |c| c.tls = Some(files))).await;

    let channel = endpoint(&server, &pki.ca).connect().await.unwrap();
    let answer = UserServiceClient::new(channel)
        .batch_get_users(request(ids.clone()))
        .await
        .expect("a call over TLS failed")
        .into_inner();
    assert_eq!(answer.users.len(), 3);

    // A client that does not trust the CA fails the handshake.
    let (stranger_ca, _, _) = ca();
    let stranger = endpoint(&server, &stranger_ca).connect().await;
    assert!(stranger.is_err(), "a client of another CA connected");

    // Plaintext HTTP/2 to the TLS port gets no answer from the service.
    let plaintext = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let status = UserServiceClient::new(channel)
            .batch_get_users(request(ids.clone()))
            .await
            .unwrap_err();
        assert_ne!(status.code(), tonic::Code::Ok);
    }

    // The real grpcurl: a full handshake, reflection and a call.
    let addr = server.addr.to_string();
    let ca_file = pki.ca_file();
    let id = ids[0].to_string();
    tokio::task::spawn_blocking(move || {
        let tls = ["-cacert", &ca_file, "-authority", "localhost"];
        let (ok, services, err) = grpcurl(&[&tls[..], &[&addr, "list"]].concat());
        assert!(ok, "grpcurl over TLS failed: {err}");
        assert!(services.contains("user.v1.UserService"), "{services}");
        let body = format!("{{\"ids\": [{id}]}}");
        let (ok, out, err) = grpcurl(
            &[
                &tls[..],
                &["-d", &body, &addr, "user.v1.UserService/BatchGetUsers"],
            ]
            .concat(),
        );
        assert!(ok && out.contains("\"email\""), "{out}{err}");
        // The bundled clients, over TLS.
        let https = format!("https://localhost:{}", addr.rsplit_once(':').unwrap().1);
        let bin = env!("CARGO_BIN_EXE_user-rpc");
        let get = std::process::Command::new(bin)
            .args(["get", "--addr", &https, "--ca-cert", &ca_file, "--ids", &id])
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&get.stdout);
        assert!(
            get.status.success() && printed.contains("@example.com"),
            "get over TLS: {printed}{}",
            String::from_utf8_lossy(&get.stderr)
        );
        let bench = std::process::Command::new(bin)
            .args(["bench", "--addr", &https, "--ca-cert", &ca_file, "--json"])
            .args([
                "--concurrency",
                "1",
                "--requests",
                "5",
                "--batch",
                "2",
                "--max-id",
                &id,
            ])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&bench.stdout);
        assert!(
            bench.status.success() && report.contains("\"requests\": 5"),
            "bench over TLS: {report}{}",
            String::from_utf8_lossy(&bench.stderr)
        );
        let without_ca = std::process::Command::new(bin)
            .args(["get", "--addr", &https, "--ids", &id])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&without_ca.stderr);
        assert!(
            !without_ca.status.success() && said.contains("give --ca-cert"),
            "{said}"
        );
        // grpcurl retries a failing connection until its connect timeout (10 s by default).
        let (ok, _, _) = grpcurl(&["-plaintext", "-connect-timeout", "1", &addr, "list"]);
        assert!(!ok, "grpcurl -plaintext reached the TLS listener");
    })
    .await
    .unwrap();
}

async fn bind_error(pool: &PgPool, files: TlsFiles) -> String {
    let svc = context(pool, |c| c.tls = Some(files));
    let any = "127.0.0.1:0".parse().unwrap();
    match Application::bind(svc, any, any).await {
        Ok(_) => panic!("the server started with bad TLS files"),
        Err(err) => format!("{err:#}"),
    }
}

#[sqlx::test(migrator = "user_rpc::svc::MIGRATOR")]
async fn bad_tls_files_stop_the_start_and_name_the_file(pool: PgPool) {
    let pki = Pki::new();
    let missing = Path::new("/nonexistent/server.pem").to_path_buf();
    let err = bind_error(
        &pool,
        TlsFiles {
            cert: missing,
            key: pki.files.key.clone(),
        },
    )
    .await;
    assert!(
        err.contains("cannot read the TLS certificate /nonexistent/server.pem"),
        "{err}"
    );

    let garbage = pki.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let err = bind_error(
        &pool,
        TlsFiles {
            cert: garbage,
            key: pki.files.key.clone(),
        },
    )
    .await;
    assert!(err.contains("invalid TLS certificate"), "{err}");

    // A key that is not the certificate's.
    let other_key = pki.dir.join("other.key");
    std::fs::write(
        &other_key,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let err = bind_error(
        &pool,
        TlsFiles {
            cert: pki.files.cert.clone(),
            key: other_key,
        },
    )
    .await;
    assert!(err.contains("the key must match"), "{err}");
}
