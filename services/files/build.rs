//! Rebuilds when a migration changes: `sqlx::migrate!` embeds the files but cannot tell Cargo.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
