//! Configuration: built-in defaults < optional YAML file < environment < command-line flags.
//!
//! Every setting is a flag and an environment variable ([`Settings`], documented by `--help`) and
//! a key of the same name in the YAML file (`--config etc/user-rpc.yaml`, as go-zero does). The
//! merged result is a validated [`Config`]; nothing else in the crate reads the environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::pb::Strategy;

/// The database `serve`, `migrate` and `seed` use (and create) when none is configured.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/user_rpc";

/// Settings as given by a flag, the environment or the file; `None` means "not given here".
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// PostgreSQL URL [default: postgres://postgres@127.0.0.1:5432/user_rpc]. The database is
    /// created if it does not exist.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Largest number of pooled database connections [default: 20].
    #[arg(long, env = "USER_RPC_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<u32>,

    /// How long a query may wait for a pooled connection before the call fails with
    /// UNAVAILABLE, in milliseconds [default: 1000].
    #[arg(long, env = "USER_RPC_DB_ACQUIRE_TIMEOUT_MS")]
    pub db_acquire_timeout_ms: Option<u64>,

    /// Ping a pooled connection before every checkout (sqlx's `test_before_acquire`): one more
    /// round trip per checkout, in exchange for finding connections that died while idle
    /// [default: true].
    #[arg(long, env = "USER_RPC_DB_TEST_BEFORE_ACQUIRE")]
    pub db_test_before_acquire: Option<bool>,

    /// Concurrent lookups per batch for the errgroup and mapreduce strategies [default: 16].
    #[arg(long, env = "USER_RPC_WORKERS")]
    pub workers: Option<usize>,

    /// Largest number of ids one BatchGetUsers call may ask for [default: 1000].
    #[arg(long, env = "USER_RPC_MAX_BATCH")]
    pub max_batch: Option<usize>,

    /// Most ids per `ANY($1)` query of the batch-query strategy; larger batches are split
    /// [default: 1000].
    #[arg(long, env = "USER_RPC_BATCH_QUERY_CHUNK")]
    pub batch_query_chunk: Option<usize>,

    /// Strategy used when a request leaves it UNSPECIFIED: errgroup, mapreduce or batch-query
    /// [default: batch-query].
    #[arg(long, env = "USER_RPC_DEFAULT_STRATEGY", value_parser = parse_strategy)]
    #[serde(default, deserialize_with = "deserialize_strategy")]
    pub default_strategy: Option<Strategy>,

    /// Deadline of a call whose client sent none, in milliseconds (go-zero's default is 2000)
    /// [default: 2000].
    #[arg(long, env = "USER_RPC_TIMEOUT_MS")]
    pub timeout_ms: Option<u64>,

    /// How often the database is checked for the gRPC health service, in milliseconds
    /// [default: 2000].
    #[arg(long, env = "USER_RPC_HEALTH_CHECK_INTERVAL_MS")]
    pub health_check_interval_ms: Option<u64>,

    /// Calls slower than this are logged at WARN with method, strategy, batch size and duration,
    /// in milliseconds (go-zero's slow-call threshold) [default: 500].
    #[arg(long, env = "USER_RPC_SLOW_CALL_MS")]
    pub slow_call_ms: Option<u64>,

    /// Calls served at once; one more is refused with RESOURCE_EXHAUSTED instead of queueing
    /// (load shedding) [default: 256].
    #[arg(long, env = "USER_RPC_MAX_CONCURRENT_CALLS")]
    pub max_concurrent_calls: Option<usize>,

    /// After SIGTERM/SIGINT, how long in-flight calls may finish before the server stops anyway,
    /// in milliseconds [default: 10000].
    #[arg(long, env = "USER_RPC_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,

    /// PEM certificate chain for TLS on the gRPC listener (with --tls-key); without both, the
    /// listener speaks plaintext h2c.
    #[arg(long, env = "USER_RPC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "USER_RPC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl Settings {
    /// Field by field, `self` where given, else `lower`.
    #[must_use]
    pub fn or(self, lower: Self) -> Self {
        Self {
            database_url: self.database_url.or(lower.database_url),
            db_max_connections: self.db_max_connections.or(lower.db_max_connections),
            db_acquire_timeout_ms: self.db_acquire_timeout_ms.or(lower.db_acquire_timeout_ms),
            db_test_before_acquire: self.db_test_before_acquire.or(lower.db_test_before_acquire),
            workers: self.workers.or(lower.workers),
            max_batch: self.max_batch.or(lower.max_batch),
            batch_query_chunk: self.batch_query_chunk.or(lower.batch_query_chunk),
            default_strategy: self.default_strategy.or(lower.default_strategy),
            timeout_ms: self.timeout_ms.or(lower.timeout_ms),
            health_check_interval_ms: self
                .health_check_interval_ms
                .or(lower.health_check_interval_ms),
            slow_call_ms: self.slow_call_ms.or(lower.slow_call_ms),
            max_concurrent_calls: self.max_concurrent_calls.or(lower.max_concurrent_calls),
            shutdown_grace_ms: self.shutdown_grace_ms.or(lower.shutdown_grace_ms),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
        }
    }

    /// Reads a YAML file whose keys are the long flag names with `_` for `-`.
    ///
    /// # Errors
    /// If the file cannot be read or has an unknown key or a value of the wrong type.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml_ng::Error,
    },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// The validated configuration every layer reads (go-zero's `config.Config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub database_url: String,
    pub db_max_connections: u32,
    pub db_acquire_timeout: Duration,
    pub db_test_before_acquire: bool,
    pub workers: usize,
    pub max_batch: usize,
    pub batch_query_chunk: usize,
    pub default_strategy: Strategy,
    pub timeout: Duration,
    pub health_check_interval: Duration,
    pub slow_call: Duration,
    pub max_concurrent_calls: usize,
    pub shutdown_grace: Duration,
    /// TLS for the gRPC listener; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
}

/// Where the gRPC listener's certificate chain and private key are (PEM files, read at start-up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            db_max_connections: 20,
            db_acquire_timeout: Duration::from_millis(1000),
            db_test_before_acquire: true,
            workers: crate::concurrency::mr::DEFAULT_WORKERS,
            max_batch: 1000,
            batch_query_chunk: 1000,
            default_strategy: Strategy::BatchQuery,
            timeout: Duration::from_millis(2000),
            health_check_interval: Duration::from_millis(2000),
            slow_call: Duration::from_millis(500),
            max_concurrent_calls: 256,
            shutdown_grace: Duration::from_millis(10_000),
            tls: None,
        }
    }
}

impl Config {
    /// Fills what `settings` leaves out with the defaults and checks the result.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a zero size or an unspecified default strategy.
    pub fn from_settings(settings: Settings) -> Result<Self, ConfigError> {
        let d = Self::default();
        let config = Self {
            database_url: settings.database_url.unwrap_or(d.database_url),
            db_max_connections: settings.db_max_connections.unwrap_or(d.db_max_connections),
            db_acquire_timeout: settings
                .db_acquire_timeout_ms
                .map_or(d.db_acquire_timeout, Duration::from_millis),
            db_test_before_acquire: settings
                .db_test_before_acquire
                .unwrap_or(d.db_test_before_acquire),
            workers: settings.workers.unwrap_or(d.workers),
            max_batch: settings.max_batch.unwrap_or(d.max_batch),
            batch_query_chunk: settings.batch_query_chunk.unwrap_or(d.batch_query_chunk),
            default_strategy: settings.default_strategy.unwrap_or(d.default_strategy),
            timeout: settings.timeout_ms.map_or(d.timeout, Duration::from_millis),
            health_check_interval: settings
                .health_check_interval_ms
                .map_or(d.health_check_interval, Duration::from_millis),
            slow_call: settings
                .slow_call_ms
                .map_or(d.slow_call, Duration::from_millis),
            max_concurrent_calls: settings
                .max_concurrent_calls
                .unwrap_or(d.max_concurrent_calls),
            shutdown_grace: settings
                .shutdown_grace_ms
                .map_or(d.shutdown_grace, Duration::from_millis),
            tls: match (settings.tls_cert, settings.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                (None, None) => None,
                (cert, _) => {
                    return Err(ConfigError::Invalid {
                        name: if cert.is_some() {
                            "tls_key"
                        } else {
                            "tls_cert"
                        },
                        reason: "tls_cert and tls_key go together: give both or neither".into(),
                    });
                }
            },
        };
        let positive = [
            ("db_max_connections", config.db_max_connections as usize),
            ("workers", config.workers),
            ("max_batch", config.max_batch),
            ("batch_query_chunk", config.batch_query_chunk),
            ("max_concurrent_calls", config.max_concurrent_calls),
            ("timeout_ms", config.timeout.as_millis() as usize),
            (
                "db_acquire_timeout_ms",
                config.db_acquire_timeout.as_millis() as usize,
            ),
            (
                "health_check_interval_ms",
                config.health_check_interval.as_millis() as usize,
            ),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::Invalid {
                name,
                reason: "must be greater than 0".into(),
            });
        }
        if config.default_strategy == Strategy::Unspecified {
            return Err(ConfigError::Invalid {
                name: "default_strategy",
                reason: "must be errgroup, mapreduce or batch-query".into(),
            });
        }
        Ok(config)
    }

    /// Merges flags/env (`cli`, clap has already put flags over env) over the optional file.
    ///
    /// # Errors
    /// As [`Settings::from_file`] and [`Config::from_settings`].
    pub fn load(cli: Settings, file: Option<&Path>) -> Result<Self, ConfigError> {
        let file = file
            .map(Settings::from_file)
            .transpose()?
            .unwrap_or_default();
        Self::from_settings(cli.or(file))
    }
}

/// The names people type for a strategy: `errgroup`, `mapreduce`, `batch-query` (also the proto
/// names, in any case).
pub fn parse_strategy(name: &str) -> Result<Strategy, String> {
    let normalized = name.trim().to_ascii_lowercase().replace('_', "-");
    match normalized.trim_start_matches("strategy-") {
        "errgroup" => Ok(Strategy::Errgroup),
        "mapreduce" | "map-reduce" | "mr" => Ok(Strategy::Mapreduce),
        "batch-query" | "batchquery" | "batch" => Ok(Strategy::BatchQuery),
        _ => Err(format!(
            "unknown strategy {name:?}: use errgroup, mapreduce or batch-query"
        )),
    }
}

fn deserialize_strategy<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Strategy>, D::Error> {
    Option::<String>::deserialize(deserializer)?
        .map(|name| parse_strategy(&name).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_env_win_over_the_file_which_wins_over_defaults() {
        let file = Settings {
            workers: Some(4),
            max_batch: Some(50),
            ..Settings::default()
        };
        let cli = Settings {
            workers: Some(8),
            ..Settings::default()
        };
        let config = Config::from_settings(cli.or(file)).unwrap();
        assert_eq!(config.workers, 8);
        assert_eq!(config.max_batch, 50);
        assert_eq!(config.batch_query_chunk, 1000);
    }

    #[test]
    fn a_yaml_file_uses_the_flag_names() {
        let dir = std::env::temp_dir().join(format!("user-rpc-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("user-rpc.yaml");
        std::fs::write(
            &path,
            "workers: 3\ndefault_strategy: mapreduce\ntimeout_ms: 500\n",
        )
        .unwrap();
        let config = Config::load(Settings::default(), Some(&path)).unwrap();
        assert_eq!(config.workers, 3);
        assert_eq!(config.default_strategy, Strategy::Mapreduce);
        assert_eq!(config.timeout, Duration::from_millis(500));

        std::fs::write(&path, "wokers: 3\n").unwrap();
        let err = Config::load(Settings::default(), Some(&path)).unwrap_err();
        assert!(err.to_string().contains("unknown field `wokers`"), "{err}");
    }

    #[test]
    fn a_tls_certificate_needs_its_key() {
        let err = Config::from_settings(Settings {
            tls_cert: Some("server.pem".into()),
            ..Settings::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting tls_key: tls_cert and tls_key go together: give both or neither"
        );
        let config = Config::from_settings(Settings {
            tls_cert: Some("server.pem".into()),
            tls_key: Some("server.key".into()),
            ..Settings::default()
        })
        .unwrap();
        assert_eq!(
            config.tls,
            Some(TlsFiles {
                cert: "server.pem".into(),
                key: "server.key".into()
            })
        );
    }

    #[test]
    fn zero_sizes_are_rejected_with_the_setting_name() {
        let err = Config::from_settings(Settings {
            max_batch: Some(0),
            ..Settings::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting max_batch: must be greater than 0"
        );
    }

    #[test]
    fn strategy_names_parse_in_every_spelling_people_use() {
        for name in [
            "batch-query",
            "BATCH_QUERY",
            "STRATEGY_BATCH_QUERY",
            "batch_query",
        ] {
            assert_eq!(parse_strategy(name), Ok(Strategy::BatchQuery), "{name}");
        }
        assert_eq!(parse_strategy("MapReduce"), Ok(Strategy::Mapreduce));
        assert_eq!(parse_strategy("errgroup"), Ok(Strategy::Errgroup));
        assert!(
            parse_strategy("fastest")
                .unwrap_err()
                .contains("use errgroup")
        );
    }
}
