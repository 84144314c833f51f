//! PgBouncer for tests: a pooler of a test's own in front of the test run's PostgreSQL server.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{Connection, PgConnection, Row};

use super::{free_ports, postgres_url};

/// A PgBouncer in transaction mode in front of the test server ([`postgres_url`]): each
/// transaction of a client runs on whichever of a few server connections is free, as in a
/// deployment behind a pooler. Any database name is passed through (scratch databases work);
/// every client, whatever its user name, logs in without a password and reaches the server as
/// the test server's user. Listens on a free loopback port; killed and removed on drop.
/// Needs `AIMESH_PGBOUNCER_BIN` (PgBouncer 1.21 or later, for prepared statements in
/// transaction mode), which `scripts/deps.sh up` builds and writes to `.dev/env`; when tests
/// run as root it runs as `AIMESH_PG_USER`, since PgBouncer refuses root.
#[derive(Debug)]
pub struct ScratchPgBouncer {
    dir: std::path::PathBuf,
    port: u16,
    process: std::process::Child,
}

/// The user name clients give; with `auth_type = any` it matters only for the admin console.
const CLIENT_USER: &str = "postgres";

impl ScratchPgBouncer {
    /// Server connections per (database, user) pool unless a test asks for another size.
    pub const DEFAULT_POOL_SIZE: u32 = 3;

    /// Starts one with [`Self::DEFAULT_POOL_SIZE`] server connections per database.
    pub async fn start() -> Self {
        Self::start_with_pool_size(Self::DEFAULT_POOL_SIZE).await
    }

    /// Starts one with at most `pool_size` server connections per database, waiting until its
    /// admin console answers.
    pub async fn start_with_pool_size(pool_size: u32) -> Self {
        let bin = std::env::var("AIMESH_PGBOUNCER_BIN")
            .expect("AIMESH_PGBOUNCER_BIN names PgBouncer 1.21 or later (scripts/deps.sh builds it; . .dev/env)");
        let user = std::env::var("AIMESH_PG_USER").ok().filter(|user| !user.is_empty());
        // Under /var/tmp, which PgBouncer's user can reach whoever owns the checkout.
        let dir =
            std::path::PathBuf::from("/var/tmp").join(format!("aimesh-pgbouncer-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch PgBouncer's directory");
        let port = free_ports(1)[0];
        std::fs::write(dir.join("pgbouncer.ini"), config_file(&dir, port, pool_size)).expect("write pgbouncer.ini");
        // setpriv execs PgBouncer (so the child is PgBouncer itself) with a parent-death signal:
        // it dies with the test's thread even when the test is killed before its drops run.
        let mut command = std::process::Command::new("setpriv");
        command.args(["--pdeathsig", "KILL"]);
        let program = match &user {
            // A copy in its own directory: that user may not reach the checkout's .dev.
            Some(user) => {
                let copy = dir.join("pgbouncer");
                std::fs::copy(&bin, &copy).unwrap_or_else(|e| panic!("copy {bin} to {}: {e}", copy.display()));
                let owned = std::process::Command::new("chown").arg("-R").arg(user).arg(&dir).status();
                assert!(owned.is_ok_and(|s| s.success()), "chown -R {user} {}", dir.display());
                command.arg(format!("--reuid={user}")).arg(format!("--regid={user}")).arg("--init-groups");
                copy
            }
            None => std::path::PathBuf::from(&bin),
        };
        let process = command
            .arg("--")
            .arg(program)
            .arg(dir.join("pgbouncer.ini"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin} with setpriv: {e}"));
        let mut bouncer = Self { dir, port, process };
        bouncer.wait_until_ready().await;
        bouncer
    }

    /// Polls the admin console until it answers, failing at once (with the log) if PgBouncer
    /// exited.
    async fn wait_until_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let error = match self.admin().await {
                Ok(admin) => {
                    let _ = admin.close().await;
                    return;
                }
                Err(error) => error,
            };
            if let Ok(Some(status)) = self.process.try_wait() {
                panic!("pgbouncer exited during start-up ({status}):\n{}", self.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pgbouncer did not answer within 20 s ({error}):\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `postgres://postgres@127.0.0.1:port`, without a database (as [`postgres_url`]).
    pub fn url(&self) -> String {
        format!("postgres://{CLIENT_USER}@127.0.0.1:{}", self.port)
    }

    /// `url` of a database on the test server (a [`super::ScratchDatabase`]'s, say) with the
    /// same database through this PgBouncer.
    pub fn url_of(&self, url: &str) -> String {
        let options = PgConnectOptions::from_str(url).unwrap_or_else(|e| panic!("parse {url}: {e}"));
        let database = options.get_database().unwrap_or_else(|| panic!("{url} names no database"));
        crate::data::db::database_url(&self.url(), database)
    }

    /// A connection to the admin console (the `pgbouncer` database), which speaks only the
    /// simple query protocol: use it with `sqlx::raw_sql`.
    pub async fn admin(&self) -> Result<PgConnection, sqlx::Error> {
        let options = PgConnectOptions::from_str(&self.url())?.database("pgbouncer");
        PgConnection::connect_with(&options.extra_float_digits(None)).await
    }

    /// A client connection through PgBouncer to the database of `database_url` (a URL of the
    /// test server), made as the services make theirs: without the `extra_float_digits`
    /// start-up parameter, which PgBouncer would refuse.
    pub async fn client(&self, database_url: &str) -> Result<PgConnection, sqlx::Error> {
        let options = PgConnectOptions::from_str(&self.url_of(database_url))?;
        PgConnection::connect_with(&options.extra_float_digits(None)).await
    }

    /// The rows of the admin console's `SHOW <what>` (`POOLS`, `STATS`, `SERVERS`, ...).
    pub async fn show(&self, what: &str) -> Vec<ConsoleRow> {
        let mut admin = self.admin().await.expect("connect to the pgbouncer admin console");
        let statement = sqlx::AssertSqlSafe(format!("SHOW {what}"));
        let rows = sqlx::raw_sql(statement).fetch_all(&mut admin).await.unwrap_or_else(|e| panic!("SHOW {what}: {e}"));
        let _ = admin.close().await;
        rows.iter().map(ConsoleRow::of).collect()
    }

    /// `SHOW POOLS`: per (database, user), its clients and server connections and `pool_mode`.
    pub async fn pools(&self) -> Vec<ConsoleRow> {
        self.show("POOLS").await
    }

    /// `SHOW STATS`: per database, transactions, queries, server assignments and prepared
    /// statement counts since start.
    pub async fn stats(&self) -> Vec<ConsoleRow> {
        self.show("STATS").await
    }

    /// The `SHOW <what>` row of `database`, if it has one.
    pub async fn row_of(&self, what: &str, database: &str) -> Option<ConsoleRow> {
        self.show(what).await.into_iter().find(|row| row.text("database") == Some(database))
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for ScratchPgBouncer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One row of an admin console `SHOW`, each column's value as the console sent it (text).
#[derive(Debug, Clone)]
pub struct ConsoleRow {
    columns: Vec<(String, Option<String>)>,
}

impl ConsoleRow {
    fn of(row: &PgRow) -> Self {
        use sqlx::Column;
        let columns = row
            .columns()
            .iter()
            .map(|column| {
                // The simple protocol returns text whatever the column's type.
                let value = row.try_get_unchecked::<Option<String>, _>(column.ordinal()).ok().flatten();
                (column.name().to_owned(), value)
            })
            .collect();
        Self { columns }
    }

    /// The value of `column`; none if the row has no such column or it is NULL.
    pub fn text(&self, column: &str) -> Option<&str> {
        self.columns.iter().find(|(name, _)| name == column).and_then(|(_, value)| value.as_deref())
    }

    /// The value of a numeric column, panicking if it is missing or not a number.
    pub fn number(&self, column: &str) -> i64 {
        let text = self.text(column).unwrap_or_else(|| panic!("no column {column} in {self:?}"));
        text.parse().unwrap_or_else(|e| panic!("column {column} = {text:?} is not a number: {e}"))
    }
}

/// `pgbouncer.ini` for a scratch PgBouncer in `dir` on `port`.
fn config_file(dir: &std::path::Path, port: u16, pool_size: u32) -> String {
    let server = url::Url::parse(&postgres_url()).expect("AIMESH_POSTGRES_URL is a URL");
    let host = server.host_str().filter(|host| !host.is_empty()).unwrap_or("127.0.0.1");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut target = format!("host={} port={}", quoted(host), server.port().unwrap_or(5432));
    let user = percent_decoded(server.username());
    target.push_str(&format!(" user={}", quoted(if user.is_empty() { "postgres" } else { &user })));
    if let Some(password) = server.password() {
        target.push_str(&format!(" password={}", quoted(&percent_decoded(password))));
    }
    let dir = dir.display();
    // auth_type = any: clients log in as anyone, without a password, and reach the server as
    // the user of the `*` entry (which serves every database name). No
    // `ignore_startup_parameters`: the services send only parameters PgBouncer tracks.
    // server_login_retry: a scratch database that does not exist yet is retried soon.
    format!(
        "[databases]\n\
         * = {target}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = any\n\
         admin_users = {CLIENT_USER}\n\
         pool_mode = transaction\n\
         max_prepared_statements = 100\n\
         default_pool_size = {pool_size}\n\
         min_pool_size = 0\n\
         reserve_pool_size = 0\n\
         max_client_conn = 1000\n\
         server_login_retry = 1\n\
         logfile = {dir}/pgbouncer.log\n\
         pidfile = {dir}/pgbouncer.pid\n"
    )
}

/// `value` quoted for a PgBouncer connection string.
fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A URL's user info component with its `%XX` escapes decoded.
fn percent_decoded(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 3).and_then(|hex| std::str::from_utf8(hex).ok());
        match (bytes[i], escape.and_then(|hex| u8::from_str_radix(hex, 16).ok())) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}
