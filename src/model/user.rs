//! [`UserModel`]: the `users` table.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::Row as _;
use sqlx::postgres::PgRow;

use super::stash::{ConnectionStash, Priority};

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
            .run(Priority::InTurn, |conn| {
                Box::pin(sqlx::query_as(FIND_ONE).bind(id).fetch_optional(conn))
            })
            .await
    }

    /// The users with these ids, in no particular order; ids with no user are left out.
    ///
    /// # Errors
    /// Any database error.
    #[tracing::instrument(level = "debug", name = "db.find_many", skip_all, fields(ids = ids.len()))]
    pub async fn find_many(&self, ids: &[i64]) -> Result<Vec<User>, sqlx::Error> {
        self.stash
            .run(Priority::InTurn, |conn| {
                Box::pin(sqlx::query_as(FIND_MANY).bind(ids.to_vec()).fetch_all(conn))
            })
            .await
    }

    /// `SELECT 1`: is the database answering? It goes before every waiting lookup, so that an
    /// overloaded service is not reported down.
    ///
    /// # Errors
    /// Any database error.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.stash
            .run(Priority::First, |conn| {
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
        self.stash.waiting()
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
