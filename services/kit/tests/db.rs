//! The PostgreSQL pool against the real server: statements slower than
//! `database.slow_statement_ms` are logged at WARN, others are not.

use std::io;
use std::sync::{Arc, Mutex};

use aimesh_kit::config::DatabaseConfig;
use aimesh_kit::data::db;
use aimesh_kit::testing;

/// What a `tracing` subscriber wrote, shared with the test.
#[derive(Debug, Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The lines that mention `marker`.
    fn lines_of(&self, marker: &str) -> Vec<String> {
        let text = String::from_utf8(self.0.lock().expect("capture lock").clone()).expect("utf-8 log");
        text.lines().filter(|line| line.contains(marker)).map(str::to_owned).collect()
    }
}

/// The level (`WARN`, `TRACE`, ...) a line of the fmt subscriber starts with.
fn level(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or_default()
}

// A current-thread runtime: sqlx logs on the thread that runs the query, where the subscriber
// below is the default.
#[tokio::test]
async fn a_statement_slower_than_the_bound_is_logged_at_warn_and_a_fast_one_is_not() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .without_time()
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    // 500 ms: below sqlx's own default bound of 1 s, so a WARN for a 0.6 s statement can only
    // come from the configured bound; far above what `SELECT 1` takes on a busy machine.
    let settings =
        DatabaseConfig { max_connections: 1, min_connections: 0, slow_statement_ms: 500, ..Default::default() };
    let url = db::database_url(&testing::postgres_url(), "postgres");
    let pool = db::connect(&url, &settings).await.expect("connect to the test server");
    sqlx::query("SELECT pg_sleep(0.6) AS slow_statement").execute(&pool).await.expect("slow statement");
    let one: i32 = sqlx::query_scalar("SELECT 1 AS fast_statement").fetch_one(&pool).await.expect("fast statement");
    assert_eq!(one, 1);
    pool.close().await;

    let slow = captured.lines_of("slow_statement");
    assert_eq!(slow.iter().map(|line| level(line)).collect::<Vec<_>>(), ["WARN"], "{slow:#?}");
    assert!(slow[0].contains("slow statement: execution time exceeded alert threshold"), "{slow:#?}");
    assert!(slow[0].contains("slow_threshold=500ms"), "{slow:#?}");
    // Logged, as every statement is, but at TRACE.
    let fast = captured.lines_of("fast_statement");
    assert_eq!(fast.iter().map(|line| level(line)).collect::<Vec<_>>(), ["TRACE"], "{fast:#?}");
}
