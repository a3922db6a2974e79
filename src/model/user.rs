//! [`UserModel`]: the `users` table.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// A row of `users`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
}

/// A user to insert; the database assigns the id and `created_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    pub name: String,
    pub email: String,
}

/// Queries on `users`. Cheap to clone: it holds the pool, which is a handle.
#[derive(Debug, Clone)]
pub struct UserModel {
    pool: PgPool,
}

impl UserModel {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The user with this id, if any: one primary-key lookup.
    ///
    /// # Errors
    /// Any database error.
    pub async fn find_one(&self, id: i64) -> Result<Option<User>, sqlx::Error> {
        sqlx::query_as("SELECT id, name, email, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// The users with these ids, in no particular order; ids with no user are left out.
    ///
    /// # Errors
    /// Any database error.
    pub async fn find_many(&self, ids: &[i64]) -> Result<Vec<User>, sqlx::Error> {
        sqlx::query_as("SELECT id, name, email, created_at FROM users WHERE id = ANY($1)")
            .bind(ids.to_vec())
            .fetch_all(&self.pool)
            .await
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
