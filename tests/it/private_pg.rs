//! A PostgreSQL server of the test's own: `initdb` into a temporary directory and `postgres` on a
//! free port, so a test can stop, kill and restart the database without harming anything else.
//!
//! The server binaries come from `PG_BIN`, else `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/*/bin`. PostgreSQL refuses to run as root: when the tests run as root the
//! server runs as the `postgres` user (the data directory is handed to it).

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection as _;

/// How long a start may take before the test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    server: Option<Child>,
}

impl PrivatePostgres {
    /// A new cluster (superuser `postgres`, trust authentication), started and accepting.
    pub async fn start() -> Self {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "user-rpc-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let owner = running_as_root().then(postgres_user);
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let initdb = as_owner(Command::new(bin.join("initdb")), owner)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .output()
            .expect("initdb could not run (set PG_BIN to PostgreSQL's bin directory)");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let port = free_port();
        let mut pg = Self {
            dir,
            port,
            bin,
            owner,
            server: None,
        };
        pg.restart().await;
        pg
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Starts the server (again, on the same port and data) and waits until it accepts queries.
    pub async fn restart(&mut self) {
        assert!(self.server.is_none(), "the server is already running");
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let server = as_owner(Command::new(self.bin.join("postgres")), self.owner)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=100",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres could not start");
        self.server = Some(server);
        let started = Instant::now();
        let url = self.url("postgres");
        loop {
            if let Ok(conn) = sqlx::PgConnection::connect(&url).await {
                let _ = conn.close().await;
                return;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "the private PostgreSQL did not start; see {}",
                self.dir.join("server.log").display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A fast shutdown (SIGINT), as `pg_ctl stop -m fast` or a restart by an operator does:
    /// sessions are terminated with 57P01 and the port closes.
    pub async fn stop(&mut self) {
        self.signal("INT").await;
    }

    /// An immediate shutdown (SIGQUIT): sessions are cut off as in a crash.
    pub async fn kill(&mut self) {
        self.signal("QUIT").await;
    }

    async fn signal(&mut self, signal: &str) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(server.id().to_string())
            .status();
        let until = Instant::now() + START_TIMEOUT;
        while server.try_wait().ok().flatten().is_none() {
            if Instant::now() > until {
                let _ = server.kill();
                let _ = server.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &server.id().to_string()])
                .status();
            let _ = server.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn as_owner(mut command: Command, owner: Option<(u32, u32)>) -> Command {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
    command
}

fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return dir.into();
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL server binaries: install postgresql or set PG_BIN")
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .map(|uids| uids.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

/// The uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string(Path::new("/etc/passwd")).unwrap();
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres"))
                .then(|| (fields[2].parse().unwrap(), fields[3].parse().unwrap()))
        })
        .expect("tests run as root need a `postgres` user to run the private PostgreSQL")
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
