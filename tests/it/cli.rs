//! The `user-rpc` binary as a person runs it: migrate into a database that does not exist yet,
//! seed, serve, get, and stop with SIGTERM.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

const BIN: &str = env!("CARGO_BIN_EXE_user-rpc");

/// `DATABASE_URL` with the database replaced by `name`.
fn url_for(name: &str) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL must be set for these tests");
    let (server, _) = base.rsplit_once('/').expect("DATABASE_URL ends in /DBNAME");
    format!("{server}/{name}")
}

fn run(args: &[&str], url: &str) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// Drops the database on the way out, pass or fail.
struct Database(String);

impl Drop for Database {
    fn drop(&mut self) {
        let admin = url_for("postgres");
        let name = self.0.clone();
        // A fresh runtime: this runs during unwinding too, outside any test runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let pool = sqlx::PgPool::connect(&admin).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&pool)
                .await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .join();
    }
}

/// Kills the server on the way out if the test fails before stopping it, so that a failure
/// cannot leave a process behind holding the test runner's output open.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

type Lines = std::io::Lines<BufReader<std::process::ChildStderr>>;

/// Starts `user-rpc serve` on free ports and returns it with its gRPC address and its log.
fn start_serve(url: &str, extra: &[&str]) -> (Child, String, Lines) {
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let mut server = Child(
        Command::new(BIN)
            .args(&args)
            .env("DATABASE_URL", url)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(server.0.stderr.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| {
            let after = line.split(" addr=").nth(1)?;
            after.split_whitespace().next().map(str::to_string)
        })
        .expect("serve never logged its address");
    (server, addr, lines)
}

/// Sends SIGTERM and waits (at most 10 s) for the process to exit.
fn stop_with_sigterm(server: &mut Child) -> std::process::ExitStatus {
    let killed = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "serve ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn migrate_seed_serve_get_and_sigterm_from_a_database_that_does_not_exist() {
    let name = format!("user_rpc_cli_{}", std::process::id());
    let _cleanup = Database(name.clone());
    let url = url_for(&name);

    let migrated = run(&["migrate"], &url);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let seeded = run(&["seed", "--count", "25", "--chunk", "10"], &url);
    let out = String::from_utf8_lossy(&seeded.stdout);
    assert!(
        seeded.status.success(),
        "{}",
        String::from_utf8_lossy(&seeded.stderr)
    );
    assert!(
        out.contains("inserted 25 users") && out.contains("(25 in the table)"),
        "{out}"
    );

    let (mut server, addr, mut lines) = start_serve(&url, &[]);

    let got = run(
        &[
            "get",
            "--ids",
            "3,1,3",
            "--strategy",
            "mapreduce",
            "--addr",
            &format!("http://{addr}"),
        ],
        &url,
    );
    let out = String::from_utf8_lossy(&got.stdout);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(out.contains("2 users via STRATEGY_MAPREDUCE"), "{out}");
    assert!(
        out.find("\n         3 ").unwrap() < out.find("\n         1 ").unwrap(),
        "{out}"
    );

    let bad = run(
        &["get", "--ids", "0", "--addr", &format!("http://{addr}")],
        &url,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("InvalidArgument"));

    let status = stop_with_sigterm(&mut server);
    assert!(status.success(), "serve exited with {status} after SIGTERM");
    let rest: Vec<String> = lines.by_ref().map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM received")),
        "{rest:?}"
    );
}

#[test]
fn demo_seeds_an_empty_database_and_compares_every_strategy_and_bench_prints_json() {
    let name = format!("user_rpc_demo_{}", std::process::id());
    let _cleanup = Database(name.clone());
    let url = url_for(&name);

    let demo = run(
        &[
            "demo",
            "--users",
            "300",
            "--duration",
            "300ms",
            "--concurrency",
            "2",
            "--batch",
            "10",
        ],
        &url,
    );
    let out = String::from_utf8_lossy(&demo.stdout);
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    assert!(out.contains("seeding 300 users"), "{out}");
    for strategy in [
        "STRATEGY_ERRGROUP",
        "STRATEGY_MAPREDUCE",
        "STRATEGY_BATCH_QUERY",
    ] {
        assert!(out.contains(strategy), "{strategy} missing from:\n{out}");
    }
    assert!(out.contains("grpcurl -plaintext"), "{out}");

    let bench = run(
        &[
            "bench",
            "--json",
            "--requests",
            "20",
            "--concurrency",
            "2",
            "--batch",
            "5",
            "--strategy",
            "batch-query",
        ],
        &url,
    );
    let out = String::from_utf8_lossy(&bench.stdout);
    assert!(
        bench.status.success(),
        "{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let reports: serde_json::Value = serde_json::from_str(&out).expect("bench --json prints JSON");
    assert_eq!(reports[0]["strategy"], "STRATEGY_BATCH_QUERY");
    assert_eq!(reports[0]["requests"], 20);
    assert_eq!(reports[0]["errors"], serde_json::json!({}));
}

/// An OTLP collector that keeps the names of the spans it receives.
#[derive(Default, Clone)]
struct Collector(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut names = self.0.lock().unwrap();
        for resource in &request.get_ref().resource_spans {
            for scope in &resource.scope_spans {
                names.extend(scope.spans.iter().map(|span| span.name.clone()));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[test]
fn spans_reach_an_otlp_collector_when_an_endpoint_is_configured() {
    let name = format!("user_rpc_otlp_{}", std::process::id());
    let _cleanup = Database(name.clone());
    let url = url_for(&name);
    assert!(run(&["seed", "--count", "5"], &url).status.success());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let collector = Collector::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let (mut server, addr, _lines) = start_serve(&url, &["--otlp-endpoint", &endpoint]);
    let got = run(
        &["get", "--ids", "1,2", "--addr", &format!("http://{addr}")],
        &url,
    );
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    // Spans still batched are flushed when the server exits.
    assert!(stop_with_sigterm(&mut server).success());
    let names = collector.0.lock().unwrap().clone();
    assert!(
        names.iter().any(|n| n == "BatchGetUsers"),
        "spans received: {names:?}"
    );
}
