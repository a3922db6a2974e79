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

/// A pool of at most `max` connections to the test database, its sessions named `user-rpc`
/// as the service's are.
pub async fn small_pool(pool: &PgPool, max: u32, acquire_timeout: Duration) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .connect_with(
            (*pool.connect_options())
                .clone()
                .application_name(user_rpc::svc::APPLICATION_NAME),
        )
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

/// Replaces `users` with a view whose rows run a hook: it counts lookups (in a sequence, which
/// a failing statement does not roll back), sleeps 5 ms, and raises for `poisoned_id`.
pub async fn poison(pool: &PgPool, poisoned_id: i64) {
    hook_lookups(pool, Some(poisoned_id), Duration::from_millis(5)).await;
}

/// Replaces `users` with a view whose rows run a hook that counts lookups (see [`lookups`]),
/// sleeps `sleep` per row, and raises for `poisoned_id`. [`heal`] undoes it.
pub async fn hook_lookups(pool: &PgPool, poisoned_id: Option<i64>, sleep: Duration) {
    let poisoned = poisoned_id.map_or("NULL".to_string(), |id| id.to_string());
    let seconds = sleep.as_secs_f64();
    let statements = [
        "ALTER TABLE users RENAME TO users_real".to_string(),
        "CREATE SEQUENCE lookups".to_string(),
        format!(
            "CREATE FUNCTION lookup_hook(uid bigint) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$ \
             BEGIN PERFORM nextval('lookups'); PERFORM pg_sleep({seconds}); \
             IF uid = {poisoned} THEN RAISE EXCEPTION 'poisoned row %', uid; END IF; \
             RETURN true; END $$"
        ),
        "CREATE VIEW users AS SELECT id, name, email, created_at FROM users_real WHERE lookup_hook(id)"
            .to_string(),
    ];
    for statement in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(pool)
            .await
            .unwrap();
    }
}

/// Rows the hook of [`hook_lookups`] has seen so far.
pub async fn lookups(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM lookups")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Undoes [`hook_lookups`].
pub async fn heal(pool: &PgPool) {
    sqlx::raw_sql(
        "DROP VIEW users; DROP FUNCTION lookup_hook; DROP SEQUENCE lookups; \
         ALTER TABLE users_real RENAME TO users",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// Queries of the service still running or waiting in PostgreSQL (seen from the test's own
/// connection to the same database).
pub async fn waiting_lookups(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND state = 'active' AND query LIKE 'SELECT id, name, email, created_at FROM users%'",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Polls [`waiting_lookups`] for up to `within`; returns what is left then.
pub async fn lookups_left_after(conn: &mut sqlx::PgConnection, within: Duration) -> i64 {
    let until = std::time::Instant::now() + within;
    loop {
        let left = waiting_lookups(conn).await;
        if left == 0 || std::time::Instant::now() > until {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gRPC client over a plain HTTP/2 client.
pub type RawClient = pb::user_service_client::UserServiceClient<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic::body::Body,
    >,
>;

/// The generated client over a plain HTTP/2 client: it sends `grpc-timeout` but, unlike tonic's
/// `Channel`, does not enforce it locally, so the test sees the status the server sends.
pub fn raw_client(addr: SocketAddr) -> RawClient {
    let http2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let origin = format!("http://{addr}").parse().unwrap();
    pb::user_service_client::UserServiceClient::with_origin(http2, origin)
}

/// A BatchGetUsers request carrying `grpc-timeout: deadline` (whole milliseconds).
pub fn request_within(
    ids: Vec<i64>,
    strategy: Strategy,
    deadline: Duration,
) -> tonic::Request<pb::BatchGetUsersRequest> {
    let mut request = tonic::Request::new(pb::BatchGetUsersRequest {
        ids,
        strategy: strategy.into(),
        allow_missing: false,
    });
    request.metadata_mut().insert(
        "grpc-timeout",
        format!("{}m", deadline.as_millis()).parse().unwrap(),
    );
    request
}

/// BatchGetUsers of `ids` with `strategy`, sending `deadline` as `grpc-timeout`.
pub async fn call_within(
    client: &mut RawClient,
    ids: &[i64],
    strategy: Strategy,
    deadline: Duration,
) -> Result<pb::BatchGetUsersResponse, tonic::Status> {
    client
        .batch_get_users(request_within(ids.to_vec(), strategy, deadline))
        .await
        .map(tonic::Response::into_inner)
}

/// What is alive before a fault: tokio tasks of the test's runtime (the server runs in it).
pub struct Baseline {
    pub tasks: usize,
}

impl Baseline {
    pub fn now() -> Self {
        Self {
            tasks: tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
        }
    }

    /// Waits (up to 5 s) until nothing of a fault scenario is left behind, and panics naming what
    /// is:
    /// - the runtime's live tasks are back to the baseline (no task of a finished call lingers);
    /// - no connection is held by a finished call: every connection the pool has opened is idle
    ///   in the pool or in the stash, and no lookup waits for one;
    /// - PostgreSQL sees exactly the pool's connections from the service (`application_name`
    ///   of the pool if it has one, else every session of the database but the test's own `own`
    ///   ones): none was
    ///   opened beside the pool (e.g. to cancel a query) and left open.
    pub async fn assert_nothing_leaked(
        &self,
        svc: &ServiceContext,
        observer: &mut sqlx::PgConnection,
        own: &[i32],
        scenario: &str,
    ) {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let tasks = tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks();
            let size = svc.pool.size() as usize;
            let idle = svc.pool.num_idle() + svc.users.stashed();
            let waiting = svc.users.waiting();
            let sessions: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
                 AND NOT (pid = ANY($1)) AND ($2::text IS NULL OR application_name = $2)",
            )
            .bind(own)
            .bind(svc.pool.connect_options().get_application_name())
            .fetch_one(&mut *observer)
            .await
            .unwrap();
            let clean = tasks <= self.tasks
                && idle == size
                && waiting == 0
                && usize::try_from(sessions).ok() == Some(size);
            if clean {
                return;
            }
            if std::time::Instant::now() > until {
                panic!(
                    "{scenario}: left behind: {tasks} live tasks (baseline {}), pool {size} \
                     connections of which {idle} idle, {waiting} lookups waiting, {sessions} \
                     server sessions",
                    self.tasks
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The backend PIDs of `conns` (the test's own connections, left out of the session count).
pub async fn pids(conns: &mut [&mut sqlx::PgConnection]) -> Vec<i32> {
    let mut pids = Vec::new();
    for conn in conns {
        pids.push(
            sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut **conn)
                .await
                .unwrap(),
        );
    }
    pids
}
