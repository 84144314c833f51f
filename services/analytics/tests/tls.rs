//! ClickHouse over HTTPS: analytics connects to an `https://` URL whose certificate a private CA
//! signed when `analytics.clickhouse_ca_file` names that CA, and refuses it otherwise. The
//! server is the test run's ClickHouse behind TLS the test terminates (chDB's clickhouse-local
//! opens no HTTPS listener of its own), as a load balancer or ingress in front of it would.

use uuid::Uuid;

use aimesh_analytics::AnalyticsConfig;
use aimesh_kit::testing::{TestCertificates, TlsProxy, authority_of};

fn clickhouse_url() -> String {
    std::env::var("AIMESH_CLICKHOUSE_URL").unwrap_or_else(|_| AnalyticsConfig::default().clickhouse_url)
}

#[tokio::test]
async fn analytics_migrates_and_queries_clickhouse_over_https_with_a_private_ca() {
    let certificates = TestCertificates::generate();
    let proxy = TlsProxy::start(&authority_of(&clickhouse_url()), &certificates).await;
    let config = AnalyticsConfig {
        clickhouse_url: format!("https://127.0.0.1:{}", proxy.address.port()),
        clickhouse_database: format!("aimesh_test_{}", Uuid::new_v4().simple()),
        clickhouse_ca_file: Some(certificates.ca.clone()),
        ..AnalyticsConfig::default()
    };
    let clickhouse = aimesh_analytics::connect_clickhouse(&config).await.expect("migrate over https");
    assert!(clickhouse.is_healthy().await);
    let tables: Vec<String> = clickhouse
        .server()
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(clickhouse.database())
        .fetch_all()
        .await
        .expect("list the tables over https");
    assert!(tables.iter().any(|t| t == "usage_events"), "{tables:?}");
    clickhouse.server().query(&format!("DROP DATABASE {}", clickhouse.database())).execute().await.expect("drop");

    // Without the CA, the certificate is not trusted and nothing is sent.
    let untrusting = AnalyticsConfig { clickhouse_ca_file: None, ..config.clone() };
    let refused = aimesh_analytics::connect_clickhouse(&untrusting).await.err().map(|e| format!("{e:#}"));
    assert!(refused.is_some(), "a server whose CA is not trusted was accepted");
    // A CA file that holds no certificate is refused naming the setting.
    let empty = certificates.key.clone();
    let broken = AnalyticsConfig { clickhouse_ca_file: Some(empty), ..config };
    let refused = aimesh_analytics::connect_clickhouse(&broken).await.err().map(|e| format!("{e:#}"));
    assert!(refused.as_deref().is_some_and(|e| e.contains("analytics.clickhouse_ca_file")), "{refused:?}");
}
