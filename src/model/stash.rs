//! [`ConnectionStash`]: the connections the lookups run on, in front of the sqlx pool.
//!
//! Measured with sqlx 0.9.1 (BENCHMARKS.md): a query run against `&PgPool` costs up to three
//! round trips — the query, a ping when the connection is released (always) and a ping on
//! checkout (`test_before_acquire`). Here a query takes an idle stashed connection; when none is
//! idle and fewer than the pool's maximum are out, it acquires one more from the pool; otherwise
//! it waits until one comes back or leaves for the pool. After a *completed* query the connection
//! goes straight to the next waiting lookup, or back to the stash: one round trip per query. A
//! connection whose query failed or was cancelled midway goes back to the pool, whose release
//! ping finishes or discards it.
//!
//! Rules:
//! - **One budget.** A lookup waits at most the pool's acquire timeout for connections in all,
//!   its retry included; then it fails with [`sqlx::Error::PoolTimedOut`] (UNAVAILABLE).
//! - **Quick first, then in turn** (Go's `sync.Mutex` normal and starvation modes). A returned
//!   connection goes idle and wakes the first waiter; whoever comes first takes it, often the
//!   lookup that just returned it, which keeps a mapreduce call's workers on their connections
//!   with no task switch. But a lookup that has waited `STARVING` (50 ms) gets the next
//!   connection handed to it directly, ahead of newcomers; the health ping is first in line, so
//!   an overloaded service is not reported down. Measured (BENCHMARKS.md, "Sharing connections
//!   under contention"): with newcomers always free to take connections, overload spread them
//!   over every call: in `tests/it/faults.rs`' 10x test 46–56% of the lookups the database ran
//!   served calls that succeeded (3–4 of 24 calls did), 18 of 24 calls succeeded with a 1 s
//!   acquire timeout, and p99 at 32 callers was 141–177 ms. Always handing over in turn fixed
//!   that (95%, 24 of 24) but cost MAPREDUCE 24% of its throughput at 32 callers. Both modes:
//!   91%, 7 of 24 and 24 of 24, throughput unchanged, p99 106–118 ms.
//! - **A dead connection costs no call.** A query that fails on a reused connection because the
//!   connection died (the server restarted) is retried once on a fresh connection from the pool.
//! - **Nothing of a finished call runs on.** A query abandoned midway (deadline, caller gone) is
//!   cancelled in PostgreSQL with `pg_cancel_backend`.
//!
//! Only read-only queries go through the stash. Stashed connections are outside the pool's idle
//! timeout and maximum lifetime; [`ConnectionStash::release_idle`] hands them back.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, PgConnection, PgPool, Postgres};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

/// How long cancelling an abandoned query may take before the connection is given up on.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// A lookup that has waited this long gets the next returned connection handed to it directly;
/// before that, a returned connection goes idle and wakes the first waiter, and whoever comes
/// first takes it (Go's `sync.Mutex` switches at 1 ms; connections are held far longer than a
/// mutex, and 5 ms cost MAPREDUCE a quarter of its throughput at 32 callers). See the module
/// docs.
const STARVING: Duration = Duration::from_millis(50);

/// Where a lookup stands in line for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Ahead of every lookup (the health ping).
    First,
    /// Behind the lookups that asked before it.
    InTurn,
}

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

/// Connections handed from one finished query straight to the next (see the module docs).
#[derive(Debug)]
pub struct ConnectionStash {
    pool: PgPool,
    state: Mutex<State>,
    /// Wakes the first waiter when a connection goes idle.
    returned: Notify,
    /// Lookups waiting for a connection (from the stash or the pool).
    waiting: AtomicUsize,
    max: usize,
    wait: Duration,
}

#[derive(Debug, Default)]
struct State {
    idle: Vec<Stashed>,
    /// Connections taken from the pool and not yet handed back to it (idle, leased, or being
    /// acquired).
    out: usize,
    /// Lookups waiting for a connection, in the order they are to be served.
    waiters: BTreeMap<(Priority, u64), Waiter>,
    next: u64,
}

/// A lookup in line.
#[derive(Debug)]
struct Waiter {
    grant: oneshot::Sender<Grant>,
    since: Instant,
}

/// What a waiting lookup is handed.
#[derive(Debug)]
enum Grant {
    /// A connection that just finished a query.
    Conn(Stashed),
    /// The right to take one more connection from the pool (one left for it).
    Slot,
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

/// A waiting lookup's place in line. Dropped (served, timed out, or its call abandoned), it
/// leaves the line, and a grant that reached it too late is passed on, never lost.
struct Ticket<'a> {
    stash: &'a ConnectionStash,
    key: (Priority, u64),
    grant: oneshot::Receiver<Grant>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        // Grants are sent under the lock: once we are out of the line, none is on its way.
        self.stash.lock().waiters.remove(&self.key);
        self.grant.close();
        if let Ok(grant) = self.grant.try_recv() {
            self.stash.dispatch(grant);
        }
    }
}

/// A connection being taken from the pool on the stash's account: gives the slot back if the
/// acquire fails or is cancelled.
struct Slot<'a>(&'a ConnectionStash);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.dispatch(Grant::Slot);
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
            self.stash.dispatch(Grant::Conn(stashed));
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(stashed) = self.conn.take() {
            self.stash.dispatch(Grant::Slot);
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
            state: Mutex::new(State::default()),
            returned: Notify::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Idle connections in the stash (the pool counts them as in use).
    pub fn idle(&self) -> usize {
        self.lock().idle.len()
    }

    /// Lookups waiting for a connection right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Hands every idle connection back to the pool, e.g. before the pool closes.
    pub fn release_idle(&self) {
        let idle = {
            let mut state = self.lock();
            state.out -= state.idle.len();
            std::mem::take(&mut state.idle)
        };
        drop(idle);
    }

    /// Runs a read-only `query` on a stashed connection, retrying it once on a fresh connection
    /// if a reused one turns out dead. All the waiting for connections, the retry's included,
    /// fits in one acquire timeout: a lookup never waits longer than that for the database.
    ///
    /// # Errors
    /// The query's error, or [`sqlx::Error::PoolTimedOut`] once the acquire timeout has passed.
    pub async fn run<T, F>(&self, priority: Priority, mut query: F) -> Result<T, sqlx::Error>
    where
        F: for<'c> FnMut(&'c mut PgConnection) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        let deadline = Instant::now() + self.wait;
        let mut lease = self.lease(priority, deadline).await?;
        let result = query(lease.conn()?).await;
        lease.finished = true;
        match result {
            Ok(value) => {
                lease.keep();
                Ok(value)
            }
            Err(err) if lease.reused && is_connection_failure(&err) => {
                tracing::debug!(error = %err, "stashed connection died; retrying on a fresh one");
                // The dead connection goes back to the pool, which discards it; its slot stays
                // with this lookup for the fresh one, so the stash never counts more than the
                // pool's maximum (a fresh acquire beyond it would wait on connections that
                // circulate in the stash and never go back to the pool).
                let dead = lease.conn.take();
                drop(lease);
                drop(dead);
                let mut fresh = self.acquire_counted(deadline).await?;
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

    /// An idle connection, else one more from the pool if fewer than its maximum are out, else
    /// a place in line, by `deadline`: woken when a connection goes idle, it takes it if nobody
    /// was quicker; once `STARVING`, connections and slots are handed to it in turn.
    async fn lease(&self, priority: Priority, deadline: Instant) -> Result<Lease<'_>, sqlx::Error> {
        let since = Instant::now();
        let mut ticket = {
            let mut state = self.lock();
            if let Some(conn) = state.idle.pop() {
                return Ok(self.lent(conn, true));
            }
            if state.out < self.max {
                state.out += 1;
                None
            } else {
                let (sender, grant) = oneshot::channel();
                let key = (priority, state.next);
                state.next += 1;
                state.waiters.insert(
                    key,
                    Waiter {
                        grant: sender,
                        since,
                    },
                );
                Some(Ticket {
                    stash: self,
                    key,
                    grant,
                })
            }
        };
        let Some(ticket) = ticket.as_mut() else {
            return self.acquire_counted(deadline).await;
        };
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        let mut starving = false;
        loop {
            let returned = self.returned.notified();
            let mut returned = pin!(returned);
            // Registered before looking, so a connection going idle in between is not missed.
            returned.as_mut().enable();
            if let Some(conn) = self.lock().idle.pop() {
                return Ok(self.lent(conn, true));
            }
            tokio::select! {
                biased;
                grant = &mut ticket.grant => return match grant {
                    Ok(Grant::Conn(conn)) => Ok(self.lent(conn, true)),
                    Ok(Grant::Slot) => self.acquire_counted(deadline).await,
                    // The sender went without a grant: only when the stash itself is gone.
                    Err(_) => Err(sqlx::Error::PoolClosed),
                },
                () = &mut returned => {}
                // From now on dispatch hands connections to this lookup; one last look first.
                () = tokio::time::sleep_until(since + STARVING), if !starving => starving = true,
                () = tokio::time::sleep_until(deadline) => return Err(sqlx::Error::PoolTimedOut),
            }
        }
    }

    /// Acquires from the pool, by `deadline`, for a slot already counted in `out`.
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

    /// Hands `grant` to the first lookup in line: a slot always, a connection if that lookup is
    /// `STARVING`. Otherwise a connection goes idle and wakes the first waiter, and a slot goes
    /// back (one connection fewer on the stash's account).
    fn dispatch(&self, mut grant: Grant) {
        let mut state = self.lock();
        while let Some(first) = state.waiters.first_entry() {
            if matches!(grant, Grant::Conn(_)) && first.get().since.elapsed() < STARVING {
                break;
            }
            match first.remove().grant.send(grant) {
                Ok(()) => return,
                Err(returned) => grant = returned,
            }
        }
        match grant {
            Grant::Conn(conn) => {
                state.idle.push(conn);
                self.returned.notify_one();
            }
            Grant::Slot => state.out -= 1,
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
}
