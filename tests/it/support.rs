//! Shared helpers: seeding a test database, building the service on it, and serving it on a real
//! socket at 127.0.0.1:0.

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use user_rpc::config::Config;
use user_rpc::logic::{BatchGetUsersLogic, RequestContext};
use user_rpc::model::{NewUser, User, UserModel};
use user_rpc::pb::{self, Strategy, user_service_client::UserServiceClient};
use user_rpc::server::Application;
use user_rpc::svc::ServiceContext;

/// The strategies a client can pick, for tests that must hold for each.
pub const STRATEGIES: [Strategy; 3] = [
    Strategy::Errgroup,
    Strategy::Mapreduce,
    Strategy::BatchQuery,
];

/// Inserts `n` users and returns them ordered by id.
pub async fn seed(pool: &PgPool, n: usize) -> Vec<User> {
    let users: Vec<NewUser> = (0..n)
        .map(|i| NewUser {
            name: format!("User {i}"),
            email: format!("user{i}@example.com"),
        })
        .collect();
    let mut inserted = UserModel::new(pool.clone())
        .insert_many(&users)
        .await
        .unwrap();
    inserted.sort_by_key(|u| u.id);
    inserted
}

/// A service context on the test database with the default configuration, changed by `tweak`.
pub fn context(pool: &PgPool, tweak: impl FnOnce(&mut Config)) -> ServiceContext {
    let mut config = Config::default();
    tweak(&mut config);
    ServiceContext::new(config, pool.clone())
}

/// Runs BatchGetUsers through its logic (no transport), with a generous deadline.
pub async fn batch(
    svc: &ServiceContext,
    ids: Vec<i64>,
    strategy: Strategy,
    allow_missing: bool,
) -> Result<pb::BatchGetUsersResponse, user_rpc::error::Error> {
    batch_within(svc, ids, strategy, allow_missing, Duration::from_secs(10)).await
}

/// Runs BatchGetUsers through its logic (no transport) with the given deadline.
pub async fn batch_within(
    svc: &ServiceContext,
    ids: Vec<i64>,
    strategy: Strategy,
    allow_missing: bool,
    timeout: Duration,
) -> Result<pb::BatchGetUsersResponse, user_rpc::error::Error> {
    let ctx = RequestContext::with_timeout(timeout);
    BatchGetUsersLogic::new(ctx, svc)
        .batch_get_users(pb::BatchGetUsersRequest {
            ids,
            strategy: strategy.into(),
            allow_missing,
        })
        .await
}

/// Holds an exclusive lock on `users` until the transaction ends: every lookup waits behind it.
pub async fn lock_users(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// [`lock_users`] on a connection of the test's own (outside any pool), until `ROLLBACK`.
pub async fn lock_users_on(conn: &mut sqlx::PgConnection) {
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// A pool of at most `max` connections to the test database.
pub async fn small_pool(pool: &PgPool, max: u32, acquire_timeout: Duration) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap()
}

/// A lazy pool whose server does not exist (nothing listens on port 1).
pub fn unreachable_pool(pool: &PgPool) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(200))
        .connect_lazy_with((*pool.connect_options()).clone().port(1))
}

/// A server on a real socket, stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(svc: ServiceContext) -> Self {
        let any = "127.0.0.1:0".parse().unwrap();
        let app = Application::bind(svc, any, any).await.unwrap();
        let addr = app.local_addr();
        let admin = app.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.channel().await)
    }

    /// Stops the server the way SIGTERM does and returns how serving ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("server did not stop")
            .unwrap()
    }
}

impl Drop for TestServer {
    /// A graceful stop, not an abort: an aborted server would leave its connection tasks, and
    /// the pooled connections they hold, behind the test's back.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
