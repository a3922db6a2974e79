//! The gRPC server: [`routes`] builds every service (UserService, grpc.health.v1, reflection v1
//! and v1alpha) and [`Application`] binds and serves them, plus the admin HTTP listener
//! ([`admin`]). Building is separate from binding so that tests serve exactly what ships, on
//! port 0. Every call passes through the safety nets of [`call`].
//!
//! The server layer converts transport to logic and back — it never holds business rules.

pub mod admin;
pub mod call;
mod user_service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use user_service::UserServer;

use crate::config::{Config, TlsFiles};
use crate::pb;
use crate::pb::user_service_server::UserServiceServer;
use crate::svc::{self, ServiceContext};

/// Largest request the server decodes and largest response it encodes. A full batch of 1000
/// ids is 10 KiB, a full response about 100 KiB: 4 MiB leaves room and still stops abuse.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// The fully-qualified name the health service reports UserService under.
pub const USER_SERVICE_NAME: &str = "user.v1.UserService";

/// Every gRPC service of user-rpc, ready to serve, and the reporter that drives its health.
///
/// # Errors
/// If the embedded descriptor sets cannot be read by reflection (a build defect).
pub fn routes(svc: Arc<ServiceContext>) -> anyhow::Result<(Routes, HealthReporter)> {
    // Installed before the first call, so that no call is recorded into the void.
    crate::telemetry::metric::prometheus();
    let (reporter, health) = tonic_health::server::health_reporter();
    // Both reflection versions describe every service, each other included: by default each
    // would list only itself, and a v1alpha-only client (grpcurl 1.8) would not see v1.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let guard = call::CallGuard::new(&svc.config);
    let user_service = UserServiceServer::new(UserServer::new(svc, guard))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = Routes::new(user_service)
        .add_service(health)
        .add_service(reflection().build_v1().context("reflection v1")?)
        .add_service(reflection().build_v1alpha().context("reflection v1alpha")?);
    Ok((routes, reporter))
}

/// A bound, not yet serving, user-rpc server (zero-to-production's `Application`).
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    svc: Arc<ServiceContext>,
    /// Create the database if missing and apply migrations (with backoff) before SERVING.
    prepare_database: bool,
    /// The gRPC server, with TLS when configured (read and checked at bind time).
    server: tonic::transport::Server,
}

impl Application {
    /// Binds `listen` for gRPC and `admin` for HTTP (port 0 picks a free port). Unless
    /// `skip_migrations`, once serving it creates the database if missing and applies the
    /// migrations, retrying with backoff while the database is unreachable: the server starts
    /// even when the database is down, and health stays NOT_SERVING until it is ready.
    ///
    /// # Errors
    /// If the database URL is invalid or an address cannot be bound.
    pub async fn build(
        config: Config,
        listen: SocketAddr,
        admin: SocketAddr,
        skip_migrations: bool,
    ) -> anyhow::Result<Self> {
        let svc = ServiceContext::connect_lazy(config).context("invalid database URL")?;
        Ok(Self::bind(svc, listen, admin)
            .await?
            .preparing_database(!skip_migrations))
    }

    /// Binds `listen` (gRPC) and `admin` (HTTP) for an existing context (tests pass the pool of
    /// their own database). With `config.tls`, the gRPC listener speaks TLS only.
    ///
    /// # Errors
    /// If the TLS files cannot be read or do not hold a matching certificate and key, or an
    /// address cannot be bound.
    pub async fn bind(
        svc: ServiceContext,
        listen: SocketAddr,
        admin: SocketAddr,
    ) -> anyhow::Result<Self> {
        let server = match &svc.config.tls {
            Some(files) => tls_server(files)?,
            None => tonic::transport::Server::builder(),
        };
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let admin_listener = TcpListener::bind(admin)
            .await
            .with_context(|| format!("cannot listen on {admin} (admin)"))?;
        Ok(Self {
            local_addr: listener.local_addr()?,
            listener,
            admin_addr: admin_listener.local_addr()?,
            admin_listener,
            svc: Arc::new(svc),
            prepare_database: false,
            server,
        })
    }

    /// Whether serving starts by preparing the database in the background (create it if missing,
    /// migrate unless current, with backoff), health NOT_SERVING until it is ready, as `serve`
    /// does; [`Application::bind`] alone does not.
    #[must_use]
    pub fn preparing_database(mut self, prepare: bool) -> Self {
        self.prepare_database = prepare;
        self
    }

    /// The gRPC address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin HTTP address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves until `shutdown` completes; then reports NOT_SERVING, stops accepting, lets
    /// in-flight calls finish for at most `shutdown_grace`, and closes the pool.
    ///
    /// # Errors
    /// If serving fails.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let svc = self.svc;
        let (routes, reporter) = routes(Arc::clone(&svc))?;
        let database_up = Arc::new(AtomicBool::new(false));
        set_status(&reporter, ServingStatus::NotServing).await;
        let monitor = tokio::spawn(monitor_database(
            Arc::clone(&svc),
            reporter.clone(),
            Arc::clone(&database_up),
            self.prepare_database,
        ));
        let stop = CancellationToken::new();

        let admin = axum::serve(
            self.admin_listener,
            admin::router(Arc::clone(&svc), database_up),
        )
        .with_graceful_shutdown(stop.clone().cancelled_owned());
        let admin = tokio::spawn(async move { admin.await });

        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        tracing::info!(
            addr = %self.local_addr,
            admin = %self.admin_addr,
            tls = svc.config.tls.is_some(),
            "serving gRPC"
        );
        let mut grpc = Box::pin(
            self.server
                .layer(call::CallStartLayer)
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
        );

        let served = tokio::select! {
            served = &mut grpc => served,
            () = shutdown => {
                monitor.abort();
                set_status(&reporter, ServingStatus::NotServing).await;
                let grace = svc.config.shutdown_grace;
                tracing::info!(?grace, "shutting down: draining in-flight calls");
                stop.cancel();
                match tokio::time::timeout(grace, &mut grpc).await {
                    Ok(served) => served,
                    Err(_) => {
                        tracing::warn!(?grace, "calls still in flight after the grace period; stopping anyway");
                        Ok(())
                    }
                }
            }
        };
        drop(grpc);
        stop.cancel();
        monitor.abort();
        if tokio::time::timeout(ADMIN_STOP, admin).await.is_err() {
            tracing::warn!("admin listener did not stop in time");
        }
        tracing::info!("gRPC server stopped; closing the database pool");
        svc.users.release_stashed();
        // Calls cut off by the grace period may still hold connections: do not wait on them.
        if tokio::time::timeout(ADMIN_STOP, svc.pool.close())
            .await
            .is_err()
        {
            tracing::warn!("database connections still busy; leaving them to the exit");
        }
        tracing::info!("stopped");
        served.context("gRPC server failed")
    }
}

/// A server that speaks TLS with the certificate chain and key named in `files`, built here so
/// that a bad file stops the start, naming it, rather than the first handshake.
fn tls_server(files: &TlsFiles) -> anyhow::Result<tonic::transport::Server> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .with_context(|| format!("cannot read the TLS {what} {}", path.display()))
    };
    let identity = Identity::from_pem(read(&files.cert, "certificate")?, read(&files.key, "key")?);
    tonic::transport::Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .with_context(|| {
            format!(
                "invalid TLS certificate {} or key {} (PEM expected, and the key must match)",
                files.cert.display(),
                files.key.display()
            )
        })
}

/// How long the admin listener and the pool get to close after the gRPC server stopped.
const ADMIN_STOP: Duration = Duration::from_secs(1);

/// Longest wait between two attempts to prepare an unreachable database.
const MAX_PREPARE_BACKOFF: Duration = Duration::from_secs(5);

/// Creates the database if missing and applies the migrations, retrying with exponential backoff
/// (100 ms doubling to 5 s) until it works. Every failure is logged with its cause. A schema that
/// is already current is left alone, so a role that may only read can serve without
/// `--skip-migrations`.
async fn prepare_database(svc: &ServiceContext) {
    let mut delay = Duration::from_millis(100);
    loop {
        let prepared = if svc::schema_is_current(&svc.pool).await {
            Ok(())
        } else {
            svc::prepare(svc).await
        };
        match prepared {
            Ok(()) => {
                tracing::info!("database ready: created if missing, migrations applied");
                return;
            }
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                retry_in = ?delay,
                "database not ready: NOT_SERVING"
            ),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_PREPARE_BACKOFF);
    }
}

/// Keeps the health service honest: SERVING only once the database is prepared (when asked) and
/// while it answers `SELECT 1`.
async fn monitor_database(
    svc: Arc<ServiceContext>,
    reporter: HealthReporter,
    database_up: Arc<AtomicBool>,
    prepare: bool,
) {
    if prepare {
        prepare_database(&svc).await;
    }
    let interval = svc.config.health_check_interval;
    let mut serving = None;
    loop {
        let ping = tokio::time::timeout(interval, svc.users.ping()).await;
        let up = matches!(ping, Ok(Ok(_)));
        database_up.store(up, Ordering::Release);
        if serving != Some(up) {
            match &ping {
                Ok(Ok(_)) => tracing::info!("database reachable: SERVING"),
                Ok(Err(err)) => tracing::warn!(error = %err, "database unreachable: NOT_SERVING"),
                Err(_) => tracing::warn!(?interval, "database ping timed out: NOT_SERVING"),
            }
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_status(&reporter, status).await;
            serving = Some(up);
        }
        tokio::time::sleep(interval).await;
    }
}

async fn set_status(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(USER_SERVICE_NAME, status).await;
}
