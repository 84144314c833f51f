//! PostgreSQL for tests: scratch databases on the test run's server, and servers of a test's own.

use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};

use super::free_ports;
use crate::config::DatabaseConfig;

/// The PostgreSQL server of the test run (`AIMESH_POSTGRES_URL`).
pub fn postgres_url() -> String {
    std::env::var("AIMESH_POSTGRES_URL").unwrap_or_else(|_| crate::config::CommonConfig::default().postgres_url)
}

/// A database name no other test uses, on the test server; the database (if something created
/// it) is dropped with this value. For services that create and migrate their own database.
#[derive(Debug)]
pub struct ScratchDatabase {
    pub url: String,
    name: String,
}

impl ScratchDatabase {
    pub fn new() -> Self {
        let name = format!("aimesh_test_{}", uuid::Uuid::new_v4().simple());
        Self { url: crate::data::db::database_url(&postgres_url(), &name), name }
    }
}

impl Default for ScratchDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl ScratchDatabase {
    /// Ends every connection to `databases` at once. Drop the databases of one test only after
    /// this: `DROP DATABASE` waits until every backend of the server has absorbed a signal
    /// barrier, which a backend blocked writing a result to its client cannot do; when that
    /// client is a pool of this very process (whose runtime is the one now blocked dropping),
    /// it would wait forever. A terminated backend leaves even while blocked writing.
    pub fn disconnect_all(databases: &[ScratchDatabase]) {
        let names: Vec<String> = databases.iter().map(|database| database.name.clone()).collect();
        on_test_server(move |mut admin| async move {
            let statement = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ANY($1)";
            let _ = sqlx::query(statement).bind(names).execute(&mut admin).await;
        });
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        on_test_server(move |mut admin| async move {
            let statement = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await;
        });
    }
}

/// Runs `work` on a connection to the test server's `postgres` database, from outside async
/// code (a drop): on a thread of its own with a small runtime, waiting for it to finish.
fn on_test_server<F, Fut>(work: F)
where
    F: FnOnce(PgConnection) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let server = postgres_url();
    let thread = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async move {
            let Ok(options) = PgConnectOptions::from_str(&server) else { return };
            if let Ok(admin) = PgConnection::connect_with(&options.database("postgres")).await {
                work(admin).await;
            }
        });
    });
    let _ = thread.join();
}

/// A database that exists for one test, migrated, and is dropped with this value.
#[derive(Debug)]
pub struct TestDatabase {
    pub pool: PgPool,
    pub url: String,
    _scratch: ScratchDatabase,
}

impl TestDatabase {
    /// Creates an empty database with a unique name and applies `migrator` to it.
    pub async fn new(migrator: &Migrator) -> Self {
        let scratch = ScratchDatabase::new();
        crate::data::db::ensure_database(&scratch.url).await.unwrap_or_else(|e| {
            panic!(
                "cannot create a test database on {}: {e} (run `make test`, which starts PostgreSQL)",
                postgres_url()
            )
        });
        let settings = DatabaseConfig { max_connections: 10, min_connections: 0, ..DatabaseConfig::default() };
        let pool = crate::data::db::connect(&scratch.url, &settings).await.expect("connect to the test database");
        crate::data::db::migrate(&pool, migrator).await.expect("migrate the test database");
        Self { pool, url: scratch.url.clone(), _scratch: scratch }
    }
}

/// A PostgreSQL server of a test's own, which the test may stop and start: the shared dev server
/// must never restart under the other tests. Made with `initdb` in a temporary directory,
/// listening on a free loopback port with trust authentication; stopped and removed on drop.
/// Needs `AIMESH_PG_BIN` (and, when tests run as root, `AIMESH_PG_USER`), which
/// `scripts/deps.sh up` writes to `.dev/env`.
#[derive(Debug)]
pub struct ScratchPostgres {
    dir: std::path::PathBuf,
    port: u16,
    bin: std::path::PathBuf,
    user: Option<String>,
}

impl ScratchPostgres {
    /// Creates and starts the server.
    pub fn start() -> Self {
        let server = Self::unmade();
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(server.dir.join("data")).args(["-U", "postgres", "--auth=trust", "--no-sync"]);
        run_checked(initdb);
        server.start_again();
        server
    }

    /// A streaming replica of this server (a hot standby, read-only), copied with
    /// `pg_basebackup -R` so that it follows this server from the copy on, and started on a port
    /// of its own. Stop it or pause its replay (`pg_wal_replay_pause()`) to make it fall behind.
    pub fn start_replica(&self) -> Self {
        let replica = Self::unmade();
        let mut copy = replica.command("pg_basebackup");
        copy.arg("-D")
            .arg(replica.dir.join("data"))
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string());
        run_checked(copy);
        replica.start_again();
        replica
    }

    /// A directory and a port for a server, with nothing in them yet.
    fn unmade() -> Self {
        let bin = std::env::var("AIMESH_PG_BIN").expect("AIMESH_PG_BIN names PostgreSQL's binaries (. .dev/env)");
        let user = std::env::var("AIMESH_PG_USER").ok().filter(|user| !user.is_empty());
        // Under /var/tmp, which the PostgreSQL user can reach whoever owns the checkout.
        let dir = std::path::PathBuf::from("/var/tmp").join(format!("aimesh-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch server's directory");
        let server = Self { dir, port: free_ports(1)[0], bin: bin.into(), user };
        if let Some(user) = &server.user {
            let owned = std::process::Command::new("chown").arg(user).arg(&server.dir).status();
            assert!(owned.is_ok_and(|s| s.success()), "chown {user} {}", server.dir.display());
        }
        server
    }

    /// `postgres://postgres@127.0.0.1:port`, without a database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Stops the server (fast shutdown: sessions are ended, as in a restart).
    pub fn stop(&self) {
        let mut stop = self.pg_ctl();
        stop.args(["-m", "fast", "-w", "stop"]);
        run_checked(stop);
    }

    /// Starts the stopped server on the same port and data, waiting until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-c port={} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let mut start = self.pg_ctl();
        start.arg("-l").arg(self.dir.join("server.log")).arg("-o").arg(options).args(["-w", "start"]);
        run_checked(start);
    }

    /// `pg_ctl -D <data directory>`, to be run as PostgreSQL's user.
    fn pg_ctl(&self) -> std::process::Command {
        let mut command = self.command("pg_ctl");
        command.arg("-D").arg(self.dir.join("data"));
        command
    }

    /// One of PostgreSQL's programs, to be run as its user.
    fn command(&self, program: &str) -> std::process::Command {
        let program = self.bin.join(program);
        let Some(user) = &self.user else { return std::process::Command::new(program) };
        let mut command = std::process::Command::new("setpriv");
        command
            .arg(format!("--reuid={user}"))
            .arg(format!("--regid={user}"))
            .args(["--init-groups", "--"])
            .arg(program);
        command
    }
}

/// Runs `command`, panicking with its output if it fails.
fn run_checked(mut command: std::process::Command) {
    let output = command.output().unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl().args(["-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
