//! [`ServiceContext`] (go-zero's `svcCtx`): everything the logics share, built once at start-up.

use std::sync::Arc;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, migrate::MigrateDatabase as _};

use crate::config::Config;
use crate::model::UserModel;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The `application_name` the service's database sessions carry unless the URL names another.
pub const APPLICATION_NAME: &str = "user-rpc";

/// Configuration, pool and models: what every logic reads, and nothing per-request.
#[derive(Debug, Clone)]
pub struct ServiceContext {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub users: UserModel,
}

impl ServiceContext {
    /// Wraps an existing pool (tests hand in the pool of their fresh database).
    pub fn new(config: Config, pool: PgPool) -> Self {
        Self {
            config: Arc::new(config),
            users: UserModel::new(pool.clone()),
            pool,
        }
    }

    /// A pool for `config`, connecting lazily: the first query opens the first connection, so the
    /// service can start while the database is still coming up.
    ///
    /// # Errors
    /// If `database_url` is not a valid PostgreSQL URL.
    pub fn connect_lazy(config: Config) -> Result<Self, sqlx::Error> {
        let mut options: PgConnectOptions = config.database_url.parse()?;
        // Named in pg_stat_activity, so operators can tell the service's sessions apart.
        if options.get_application_name().is_none() {
            options = options.application_name(APPLICATION_NAME);
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.db_max_connections)
            .acquire_timeout(config.db_acquire_timeout)
            .test_before_acquire(config.db_test_before_acquire)
            .connect_lazy_with(options);
        Ok(Self::new(config, pool))
    }
}

/// Creates the database named in `url` if it does not exist yet.
///
/// # Errors
/// If the server cannot be reached or refuses.
pub async fn create_database_if_missing(url: &str) -> Result<bool, sqlx::Error> {
    if Postgres::database_exists(url).await? {
        return Ok(false);
    }
    Postgres::create_database(url).await?;
    Ok(true)
}

/// Creates the database if missing and applies the pending migrations: what `serve`, `migrate`
/// and `seed` do first.
///
/// # Errors
/// If the server cannot be reached, refuses, or a migration fails.
pub async fn prepare(svc: &ServiceContext) -> anyhow::Result<()> {
    use anyhow::Context as _;
    create_database_if_missing(&svc.config.database_url)
        .await
        .context(
            "cannot reach PostgreSQL to create the database (is it running? check DATABASE_URL)",
        )?;
    migrate(&svc.pool)
        .await
        .context("cannot apply migrations")?;
    Ok(())
}

/// Applies the embedded migrations that have not run yet.
///
/// # Errors
/// If the database cannot be reached or a migration fails.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
