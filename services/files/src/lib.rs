//! The files service: streaming uploads and downloads on an object store (the local filesystem
//! or S3), metadata in its own database, per-project deduplication, limits and quotas, download
//! links, chat attachments and garbage collection.

pub mod api;
pub mod config;
pub mod domain;
pub mod error;
pub mod library;
pub mod signing;
pub mod storage;
pub mod store;

mod service;

pub use config::FilesConfig;
pub use service::{connect_database, library, run};

/// The files database's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// A `Content-Disposition` value that downloads a file as `name`: an ASCII fallback and the
/// UTF-8 name (RFC 6266 / RFC 5987), for the gateway and presigned URLs alike.
pub fn content_disposition(name: &str) -> String {
    let fallback: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect();
    let mut encoded = String::with_capacity(name.len() * 3);
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn content_disposition_has_a_fallback_and_the_utf8_name() {
        assert_eq!(
            super::content_disposition("报告 \"Q1\".pdf"),
            "attachment; filename=\"__ _Q1_.pdf\"; filename*=UTF-8''%E6%8A%A5%E5%91%8A%20%22Q1%22.pdf"
        );
    }
}
