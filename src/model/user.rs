//! [`UserModel`]: the `users` table.

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use sqlx::Row as _;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{Connection as _, PgConnection, PgPool, Postgres};
use tokio::sync::Notify;
use tokio::time::Instant;

const FIND_ONE: &str = "SELECT id, name, email, created_at FROM users WHERE id = $1";
const FIND_MANY: &str = "SELECT id, name, email, created_at FROM users WHERE id = ANY($1)";

/// A row of `users`, as selected by every query here: `id, name, email, created_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
}

/// Decodes by position, not by name: every query here selects the same four columns in this
/// order, and the name lookup was a visible cost of decoding 100-row batches (BENCHMARKS.md).
impl sqlx::FromRow<'_, PgRow> for User {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            email: row.try_get(2)?,
            created_at: row.try_get(3)?,
        })
    }
}

/// A user to insert; the database assigns the id and `created_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    pub name: String,
    pub email: String,
}

/// Queries on `users`. Cheap to clone: it holds the pool and the shared [`ConnectionStash`]
/// that the lookups go through.
#[derive(Debug, Clone)]
pub struct UserModel {
    pool: PgPool,
    stash: Arc<ConnectionStash>,
}

impl UserModel {
    pub fn new(pool: PgPool) -> Self {
        Self {
            stash: Arc::new(ConnectionStash::new(pool.clone())),
            pool,
        }
    }

    /// The user with this id, if any: one primary-key lookup.
    ///
    /// # Errors
    /// Any database error.
    #[tracing::instrument(level = "debug", name = "db.find_one", skip(self))]
    pub async fn find_one(&self, id: i64) -> Result<Option<User>, sqlx::Error> {
        self.stash
            .run(|conn| Box::pin(sqlx::query_as(FIND_ONE).bind(id).fetch_optional(conn)))
            .await
    }

    /// The users with these ids, in no particular order; ids with no user are left out.
    ///
    /// # Errors
    /// Any database error.
    #[tracing::instrument(level = "debug", name = "db.find_many", skip_all, fields(ids = ids.len()))]
    pub async fn find_many(&self, ids: &[i64]) -> Result<Vec<User>, sqlx::Error> {
        self.stash
            .run(|conn| Box::pin(sqlx::query_as(FIND_MANY).bind(ids.to_vec()).fetch_all(conn)))
            .await
    }

    /// `SELECT 1`: is the database answering?
    ///
    /// # Errors
    /// Any database error.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.stash
            .run(|conn| {
                Box::pin(async move { sqlx::query("SELECT 1").execute(conn).await.map(drop) })
            })
            .await
    }

    /// Connections idle in the stash (the pool counts them as in use).
    pub fn stashed(&self) -> usize {
        self.stash.idle()
    }

    /// Lookups waiting for a connection right now.
    pub fn waiting(&self) -> usize {
        self.stash.waiting.load(Ordering::Acquire)
    }

    /// Hands the stash's idle connections back to the pool (before closing it: a pool waits for
    /// every connection it lent out).
    pub fn release_stashed(&self) {
        self.stash.release_idle();
    }

    /// Inserts all `users` in one statement (`UNNEST` of two arrays) and returns the new rows, in
    /// no particular order.
    ///
    /// # Errors
    /// Any database error, e.g. a duplicate email (constraint `users_email_key`).
    pub async fn insert_many(&self, users: &[NewUser]) -> Result<Vec<User>, sqlx::Error> {
        let (names, emails): (Vec<String>, Vec<String>) = users
            .iter()
            .map(|u| (u.name.clone(), u.email.clone()))
            .unzip();
        sqlx::query_as(
            "INSERT INTO users (name, email) SELECT * FROM UNNEST($1::text[], $2::text[]) \
             RETURNING id, name, email, created_at",
        )
        .bind(names)
        .bind(emails)
        .fetch_all(&self.pool)
        .await
    }

    /// The largest id in use, 0 when the table is empty.
    ///
    /// # Errors
    /// Any database error.
    pub async fn max_id(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM users")
            .fetch_one(&self.pool)
            .await
    }

    /// How many users there are.
    ///
    /// # Errors
    /// Any database error.
    pub async fn count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT count(*) FROM users")
            .fetch_one(&self.pool)
            .await
    }
}

/// How long cancelling an abandoned query may take before the connection is given up on.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `err` means the connection itself failed (I/O, protocol, server shutting it down), as
/// opposed to the query: such a connection must not be reused, and a read-only query on it may
/// be retried on another.
pub fn is_connection_failure(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Class 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown,
            // cannot connect now.
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Connections handed from one finished query straight to the next, in front of the sqlx pool.
///
/// Measured with sqlx 0.9.1 (BENCHMARKS.md): a query run against `&PgPool` costs up to three
/// round trips — the query, a ping when the connection is released (always) and a ping on
/// checkout (`test_before_acquire`). Here a query takes an idle stashed connection; when none is
/// idle and fewer than the pool's maximum are out, it acquires one more from the pool; otherwise
/// it waits until one comes back or leaves for the pool ([`Notify`], first come first served),
/// up to the pool's acquire timeout. After a *completed* query the connection goes back to the stash: one round trip per
/// query. A connection whose query failed or was cancelled midway goes back to the pool, whose
/// release ping finishes or discards it.
///
/// A query that fails on a reused connection because the connection died (the server restarted)
/// is retried once on a fresh connection from the pool, so a dead connection costs no call. A
/// query abandoned midway (deadline, caller gone) is cancelled in PostgreSQL with
/// `pg_cancel_backend`, so no work of a finished call goes on in the database.
/// Only read-only queries go through the stash. Stashed connections are outside the pool's idle
/// timeout and maximum lifetime; [`ConnectionStash::release_idle`] hands them back.
#[derive(Debug)]
pub struct ConnectionStash {
    pool: PgPool,
    idle: Mutex<Vec<Stashed>>,
    returned: Notify,
    /// Connections taken from the pool and not yet handed back to it (idle or leased).
    out: AtomicUsize,
    /// Lookups waiting for a connection (from the stash or the pool).
    waiting: AtomicUsize,
    max: usize,
    wait: Duration,
}

/// A connection of the stash and the PID of its server process, for `pg_cancel_backend`.
#[derive(Debug)]
struct Stashed {
    conn: PoolConnection<Postgres>,
    pid: i32,
}

/// Counts a lookup as waiting for a connection until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection being taken from the pool on the stash's account: gives the slot back if the
/// acquire fails or is cancelled.
struct Slot<'a>(&'a ConnectionStash);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.give_back_slot();
    }
}

/// A leased connection; dropped without [`Lease::keep`], it goes back to the pool, and if it
/// was dropped while its query still ran (the call's deadline passed, the caller went away),
/// that query is cancelled in PostgreSQL first.
struct Lease<'a> {
    stash: &'a ConnectionStash,
    conn: Option<Stashed>,
    reused: bool,
    /// The query has returned (success or error): nothing runs on the server any more.
    finished: bool,
}

impl Lease<'_> {
    fn conn(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        self.conn
            .as_mut()
            .map(|s| &mut *s.conn)
            .ok_or(sqlx::Error::PoolClosed)
    }

    fn keep(mut self) {
        if let Some(stashed) = self.conn.take() {
            self.stash.put_back(stashed);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(stashed) = self.conn.take() {
            self.stash.give_back_slot();
            if self.finished {
                drop(stashed.conn);
            } else {
                self.stash.cancel_then_release(stashed);
            }
        }
    }
}

impl ConnectionStash {
    pub fn new(pool: PgPool) -> Self {
        Self {
            max: pool.options().get_max_connections() as usize,
            wait: pool.options().get_acquire_timeout(),
            pool,
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            out: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Idle connections in the stash (the pool counts them as in use).
    pub fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Hands every idle connection back to the pool, e.g. before the pool closes.
    pub fn release_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        self.out.fetch_sub(idle.len(), Ordering::AcqRel);
        drop(idle);
        self.returned.notify_waiters();
    }

    /// One connection fewer on the stash's account (it went back to the pool, or never came):
    /// a lookup waiting because the stash was full may now take one from the pool.
    fn give_back_slot(&self) {
        self.out.fetch_sub(1, Ordering::AcqRel);
        self.returned.notify_one();
    }

    /// Runs a read-only `query` on a stashed connection, retrying it once on a fresh connection
    /// if a reused one turns out dead. All the waiting for connections, the retry's included,
    /// fits in one acquire timeout: a lookup never waits longer than that for the database.
    ///
    /// # Errors
    /// The query's error, or [`sqlx::Error::PoolTimedOut`] once the acquire timeout has passed.
    pub async fn run<T, F>(&self, mut query: F) -> Result<T, sqlx::Error>
    where
        F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        let deadline = Instant::now() + self.wait;
        let mut lease = self.lease(deadline).await?;
        let result = query(lease.conn()?).await;
        lease.finished = true;
        match result {
            Ok(value) => {
                lease.keep();
                Ok(value)
            }
            Err(err) if lease.reused && is_connection_failure(&err) => {
                tracing::debug!(error = %err, "stashed connection died; retrying on a fresh one");
                drop(lease);
                let mut fresh = self.fresh(deadline).await?;
                let retried = query(fresh.conn()?).await;
                fresh.finished = true;
                if retried.is_ok() {
                    fresh.keep();
                }
                retried
            }
            Err(err) => Err(err),
        }
    }

    async fn lease(&self, deadline: Instant) -> Result<Lease<'_>, sqlx::Error> {
        if let Some(conn) = self.pop() {
            return Ok(self.lent(conn, true));
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        loop {
            if let Some(conn) = self.pop() {
                return Ok(self.lent(conn, true));
            }
            let returned = self.returned.notified();
            let mut returned = pin!(returned);
            // Registered before the second look, so a return in between is not missed.
            returned.as_mut().enable();
            if let Some(conn) = self.pop() {
                return Ok(self.lent(conn, true));
            }
            if self.out.fetch_add(1, Ordering::AcqRel) < self.max {
                return self.acquire_counted(deadline).await;
            }
            self.out.fetch_sub(1, Ordering::AcqRel);
            if tokio::time::timeout_at(deadline, returned).await.is_err() {
                return Err(sqlx::Error::PoolTimedOut);
            }
        }
    }

    /// A connection straight from the pool, on the stash's account.
    async fn fresh(&self, deadline: Instant) -> Result<Lease<'_>, sqlx::Error> {
        self.out.fetch_add(1, Ordering::AcqRel);
        self.acquire_counted(deadline).await
    }

    /// Acquires from the pool for a slot already counted in `out`, by `deadline`.
    async fn acquire_counted(&self, deadline: Instant) -> Result<Lease<'_>, sqlx::Error> {
        // Gives the slot back if the acquire fails or is cancelled.
        let slot = Slot(self);
        let mut conn = tokio::time::timeout_at(deadline, self.pool.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        // Once per connection: the PID lets a cancelled call stop its query in PostgreSQL.
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await?;
        std::mem::forget(slot);
        Ok(self.lent(Stashed { conn, pid }, false))
    }

    fn lent(&self, conn: Stashed, reused: bool) -> Lease<'_> {
        Lease {
            stash: self,
            conn: Some(conn),
            reused,
            finished: false,
        }
    }

    /// Cancels the query still running on `stashed` (over a connection of its own), then hands
    /// the connection back to the pool. The connection stays out of reach until the cancel has
    /// been delivered, so it can only hit the abandoned query, never a later one; if it lands
    /// after all, the pool's release ping fails and the pool discards the connection. Without
    /// this an abandoned query would run, or wait on a lock, to its end.
    fn cancel_then_release(&self, stashed: Stashed) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let options = self.pool.connect_options();
        runtime.spawn(async move {
            let Stashed { conn, pid } = stashed;
            let cancelled = async {
                let mut canceller = PgConnection::connect_with(&options).await?;
                sqlx::query("SELECT pg_cancel_backend($1)")
                    .bind(pid)
                    .execute(&mut canceller)
                    .await?;
                canceller.close().await
            };
            // Bounded: a database that does not answer must not keep this task (and the
            // connection) forever.
            match tokio::time::timeout(CANCEL_TIMEOUT, cancelled).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(pid, error = %err, "could not cancel an abandoned query");
                }
                Err(_) => tracing::warn!(pid, "cancelling an abandoned query timed out"),
            }
            // Back to the pool, whose release ping waits for the cancelled query to end.
            drop(conn);
        });
    }

    fn pop(&self) -> Option<Stashed> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn put_back(&self, stashed: Stashed) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(stashed);
        self.returned.notify_one();
    }
}
