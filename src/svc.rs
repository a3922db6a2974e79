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
/// and `seed` do first (`serve` only when [`schema_is_current`] says there is something to do).
///
/// # Errors
/// If the server cannot be reached, refuses, or a migration fails; a role that may not change
/// the schema gets a hint to migrate as the owner.
pub async fn prepare(svc: &ServiceContext) -> anyhow::Result<()> {
    use anyhow::Context as _;
    create_database_if_missing(&svc.config.database_url)
        .await
        .context(
            "cannot reach PostgreSQL to create the database (is it running? check DATABASE_URL)",
        )?;
    migrate(&svc.pool).await.map_err(|err| {
        let hint = if lacks_privilege(&err) {
            "cannot apply migrations: this role may not change the schema; run `user-rpc \
             migrate` as the schema owner (see etc/postgres/roles.sql)"
        } else {
            "cannot apply migrations"
        };
        anyhow::Error::new(err).context(hint)
    })?;
    Ok(())
}

/// Whether every embedded migration is recorded as applied (false when that cannot be read).
/// Only reads, so the service's read-only role (`etc/postgres/roles.sql`) can tell that there is
/// nothing to migrate.
pub async fn schema_is_current(pool: &PgPool) -> bool {
    let applied: Result<Vec<i64>, _> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await;
    applied.is_ok_and(|applied| {
        MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .all(|m| applied.contains(&m.version))
    })
}

/// 42501 insufficient_privilege.
fn lacks_privilege(err: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError::{Execute, ExecuteMigration};
    let (Execute(sqlx::Error::Database(db)) | ExecuteMigration(sqlx::Error::Database(db), _)) = err
    else {
        return false;
    };
    db.code().as_deref() == Some("42501")
}

/// Applies the embedded migrations that have not run yet.
///
/// # Errors
/// If the database cannot be reached or a migration fails.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
