//! The `user-rpc` command line: `serve`, `migrate`, `seed`, `get`. Every flag is also an
//! environment variable (see `--help`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use std::io::IsTerminal as _;

use crate::config::{Config, Settings, parse_strategy};
use crate::loadgen::{self, LoadOptions};
use crate::model::NewUser;
use crate::pb::{self, Strategy};
use crate::server::Application;
use crate::svc::{self, ServiceContext};
use crate::telemetry::LogFormat;

/// Batch user lookups over gRPC and PostgreSQL, through errgroup, mapreduce and one ANY query.
#[derive(Debug, Parser)]
#[command(name = "user-rpc", version, about)]
pub struct Cli {
    /// YAML file of settings (keys are the long flag names with `_`); flags and env win over it.
    #[arg(long, global = true, env = "USER_RPC_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log format.
    #[arg(
        long,
        global = true,
        env = "USER_RPC_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,

    /// Also export tracing spans over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317
    /// [default: off].
    #[arg(long, global = true, env = "USER_RPC_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve gRPC (creating the database and applying migrations first, unless skipped).
    Serve {
        /// Address to listen on.
        #[arg(long, env = "USER_RPC_LISTEN", default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// Address of the admin HTTP listener (`/metrics`, `/healthz`).
        #[arg(long, env = "USER_RPC_ADMIN_LISTEN", default_value = "127.0.0.1:9464")]
        admin_listen: SocketAddr,
        /// Do not create the database or apply migrations at start-up.
        #[arg(long, env = "USER_RPC_SKIP_MIGRATIONS")]
        skip_migrations: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Create the database if missing and apply pending migrations.
    Migrate {
        #[command(flatten)]
        settings: Settings,
    },
    /// Insert COUNT realistic users, in bulk (migrating first).
    Seed {
        /// How many users to insert.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Users per INSERT statement.
        #[arg(long, default_value_t = 10_000)]
        chunk: usize,
        #[command(flatten)]
        settings: Settings,
    },
    /// Load a server with concurrent BatchGetUsers calls and compare the strategies side by side.
    Bench {
        /// Server to load, e.g. http://127.0.0.1:50051; without it, one is started in-process on
        /// the configured database.
        #[arg(long)]
        addr: Option<String>,
        #[command(flatten)]
        load: LoadArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// The first command to run: migrate, seed if empty, serve in-process, bench every strategy.
    Demo {
        /// Users to seed when the table is empty.
        #[arg(long, default_value_t = 100_000)]
        users: u64,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        settings: Settings,
    },
    /// Fetch users from a running server and print them.
    Get {
        /// Comma-separated user ids, e.g. 1,2,3.
        #[arg(
            long,
            value_delimiter = ',',
            required = true,
            allow_negative_numbers = true
        )]
        ids: Vec<i64>,
        /// errgroup, mapreduce or batch-query; the server's default if left out.
        #[arg(long, value_parser = parse_strategy)]
        strategy: Option<Strategy>,
        /// Return the users found and list missing ids instead of failing with NOT_FOUND.
        #[arg(long)]
        allow_missing: bool,
        /// The server to ask (https:// with --ca-cert for a TLS listener).
        #[arg(long, env = "USER_RPC_ADDR", default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// For an https:// --addr: the CA certificate (PEM) that signed the server's certificate.
        #[arg(long, env = "USER_RPC_CA_CERT")]
        ca_cert: Option<PathBuf>,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

/// The shape of the load, shared by `bench` and `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Concurrent callers.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// How long to load each strategy, e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Stop each strategy after this many requests (if sooner than --duration).
    #[arg(long)]
    requests: Option<u64>,
    /// Ids per BatchGetUsers call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Ids are drawn from 1..=MAX_ID [default: the largest id in the database when the server is
    /// in-process, else 100000].
    #[arg(long)]
    max_id: Option<i64>,
    /// Share of requested ids that do not exist, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    missing_ratio: f64,
    /// all, errgroup, mapreduce or batch-query.
    #[arg(long, default_value = "all")]
    strategy: String,
    /// Deadline of each call, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    call_timeout_ms: u64,
    /// For an https:// --addr: the CA certificate (PEM) that signed the server's certificate.
    #[arg(long, env = "USER_RPC_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

impl LoadArgs {
    fn options(&self, addr: String, max_id: i64) -> anyhow::Result<LoadOptions> {
        let strategies = if self.strategy.eq_ignore_ascii_case("all") {
            vec![
                Strategy::Errgroup,
                Strategy::Mapreduce,
                Strategy::BatchQuery,
            ]
        } else {
            vec![parse_strategy(&self.strategy).map_err(anyhow::Error::msg)?]
        };
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.missing_ratio),
            "--missing-ratio must be between 0.0 and 1.0"
        );
        Ok(LoadOptions {
            addr,
            ca_cert: self.ca_cert.clone(),
            concurrency: self.concurrency,
            duration: self.duration,
            requests: self.requests,
            batch: self.batch,
            max_id: self.max_id.unwrap_or(max_id),
            missing_ratio: self.missing_ratio,
            strategies,
            timeout: Duration::from_millis(self.call_timeout_ms),
            progress: std::io::stderr().is_terminal(),
        })
    }
}

/// `10s`, `250ms`, `2m`, or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: use e.g. 10s, 500ms, 2m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!(
            "invalid duration {text:?}: use e.g. 10s, 500ms, 2m"
        )),
    }
}

/// A server started in this process for `bench` and `demo`, stopped on drop. It listens on
/// 127.0.0.1 in plaintext, whatever the TLS settings.
struct InProcess {
    addr: String,
    max_id: i64,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    async fn start(svc: ServiceContext) -> anyhow::Result<Self> {
        let max_id = svc.users.max_id().await?;
        let svc = if svc.config.tls.is_some() {
            let config = Config {
                tls: None,
                ..(*svc.config).clone()
            };
            ServiceContext::new(config, svc.pool)
        } else {
            svc
        };
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let app = Application::bind(svc, any, any).await?;
        let addr = format!("http://{}", app.local_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            max_id,
            stop: Some(stop),
            served,
        })
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.served).await?
    }
}

fn print_reports(reports: &[loadgen::StrategyReport], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(reports)?);
    } else {
        print!("{}", loadgen::table(reports));
    }
    Ok(())
}

impl Cli {
    /// Runs the chosen command.
    ///
    /// # Errors
    /// Whatever stops the command; the message says what to fix.
    pub async fn run(self) -> anyhow::Result<()> {
        let file = self.config.as_deref();
        match self.command {
            Command::Serve {
                listen,
                admin_listen,
                skip_migrations,
                settings,
            } => {
                let config = Config::load(settings, file)?;
                let app = Application::build(config, listen, admin_listen, skip_migrations).await?;
                app.run_until_stopped(shutdown_signal()).await
            }
            Command::Migrate { settings } => {
                let config = Config::load(settings, file)?;
                let svc = prepare_database(config).await?;
                svc.pool.close().await;
                println!("migrations applied");
                Ok(())
            }
            Command::Seed {
                count,
                chunk,
                settings,
            } => {
                let config = Config::load(settings, file)?;
                let svc = prepare_database(config).await?;
                seed(&svc, count, chunk.max(1)).await
            }
            Command::Bench {
                addr,
                load,
                json,
                settings,
            } => {
                let (addr, server) = match addr {
                    Some(addr) => (addr, None),
                    None => {
                        let svc = prepare_database(Config::load(settings, file)?).await?;
                        let server = InProcess::start(svc).await?;
                        (server.addr.clone(), Some(server))
                    }
                };
                let max_id = server.as_ref().map_or(100_000, |s| s.max_id);
                let reports = loadgen::run(&load.options(addr, max_id)?).await;
                if let Some(server) = server {
                    server.stop().await?;
                }
                print_reports(&reports?, json)
            }
            Command::Demo {
                users,
                load,
                settings,
            } => {
                let svc = prepare_database(Config::load(settings, file)?).await?;
                if svc.users.count().await? == 0 {
                    println!("seeding {users} users...");
                    seed(&svc, users, 10_000).await?;
                }
                let server = InProcess::start(svc).await?;
                let options = load.options(server.addr.clone(), server.max_id)?;
                println!(
                    "benchmarking {} strategies: {} callers, batches of {}, {:?} each, against {}",
                    options.strategies.len(),
                    options.concurrency,
                    options.batch,
                    options.duration,
                    server.addr
                );
                let reports = loadgen::run(&options).await;
                server.stop().await?;
                print_reports(&reports?, false)?;
                println!(
                    "\nNext: `user-rpc serve`, then try\n  grpcurl -plaintext -d '{{\"ids\": [3, 1, 2], \"strategy\": \"STRATEGY_MAPREDUCE\"}}' 127.0.0.1:50051 user.v1.UserService/BatchGetUsers"
                );
                Ok(())
            }
            Command::Get {
                ids,
                strategy,
                allow_missing,
                addr,
                ca_cert,
                timeout_ms,
            } => {
                get(
                    &crate::client::endpoint(&addr, ca_cert.as_deref())?,
                    ids,
                    strategy,
                    allow_missing,
                    Duration::from_millis(timeout_ms),
                )
                .await
            }
        }
    }
}

async fn prepare_database(config: Config) -> anyhow::Result<ServiceContext> {
    let svc = ServiceContext::connect_lazy(config)?;
    svc::prepare(&svc).await?;
    Ok(svc)
}

const FIRST_NAMES: &[&str] = &[
    "Ada", "Alan", "Barbara", "Brian", "Dennis", "Donald", "Edsger", "Frances", "Grace", "John",
    "Ken", "Leslie", "Linus", "Margaret", "Niklaus", "Radia", "Rob", "Shafi", "Tony", "Yukihiro",
];
const LAST_NAMES: &[&str] = &[
    "Allen",
    "Backus",
    "Dijkstra",
    "Hamilton",
    "Hoare",
    "Hopper",
    "Kernighan",
    "Knuth",
    "Lamport",
    "Liskov",
    "Lovelace",
    "Matsumoto",
    "Perlman",
    "Pike",
    "Ritchie",
    "Thompson",
    "Torvalds",
    "Turing",
    "Wirth",
    "Goldwasser",
];

/// Bulk-inserts `count` users, `chunk` per statement, with a progress bar.
async fn seed(svc: &ServiceContext, count: u64, chunk: usize) -> anyhow::Result<()> {
    // A per-run tag keeps emails unique across repeated seeds of the same database.
    let run = chrono::Utc::now().timestamp_millis();
    let bar = ProgressBar::new(count).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} users  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut done = 0_u64;
    while done < count {
        let n = (count - done).min(chunk as u64);
        let users: Vec<NewUser> = (done..done + n)
            .map(|i| {
                let first = FIRST_NAMES[(i as usize) % FIRST_NAMES.len()];
                let last = LAST_NAMES[(i as usize / FIRST_NAMES.len()) % LAST_NAMES.len()];
                NewUser {
                    name: format!("{first} {last}"),
                    email: format!(
                        "{}.{}.{run}.{i}@example.com",
                        first.to_lowercase(),
                        last.to_lowercase()
                    ),
                }
            })
            .collect();
        svc.users
            .insert_many(&users)
            .await
            .context("inserting users failed")?;
        done += n;
        bar.set_position(done);
    }
    bar.finish_and_clear();
    let total = svc.users.count().await?;
    println!(
        "inserted {count} users in {:.2?} ({total} in the table)",
        started.elapsed()
    );
    Ok(())
}

/// Calls BatchGetUsers on a running server and prints the answer.
async fn get(
    endpoint: &tonic::transport::Endpoint,
    ids: Vec<i64>,
    strategy: Option<Strategy>,
    allow_missing: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let addr = endpoint.uri();
    let channel = endpoint
        .clone()
        .timeout(timeout)
        .connect_timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr} (is `user-rpc serve` running?)"))?;
    let mut client = pb::user_service_client::UserServiceClient::new(channel);
    let request = pb::BatchGetUsersRequest {
        ids,
        strategy: strategy.unwrap_or(Strategy::Unspecified).into(),
        allow_missing,
    };
    let response = client
        .batch_get_users(request)
        .await
        .map_err(|status| anyhow::anyhow!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    println!("{:>10}  {:<24}  {:<48}  created", "id", "name", "email");
    for user in &response.users {
        let created = user
            .create_time
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        println!(
            "{:>10}  {:<24}  {:<48}  {created}",
            user.id, user.name, user.email
        );
    }
    if !response.missing_ids.is_empty() {
        println!("missing ids: {:?}", response.missing_ids);
    }
    println!(
        "{} users via {}",
        response.users.len(),
        response.strategy().as_str_name()
    );
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn durations_read_the_way_people_write_them() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
    }
}
