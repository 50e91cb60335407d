//! Security: PostgreSQL over TLS with `sslmode=verify-full` and certificates the test makes, and
//! the least-privilege roles shipped in `deploy/postgres/` being enough to run the worker.

mod common;

use std::process::Command;
use std::time::Duration;

use common::admin_url;
use common::app::TestApp;
use common::cluster::PgCluster;
use common::registration;
use induction_reconciler::store::{Limits, Store};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use secrecy::SecretString;
use sqlx::Connection;

const BIN: &str = env!("CARGO_BIN_EXE_induction-reconciler");

struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
}

fn make_pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "induction-reconciler test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let server_cert = server
        .signed_by(&server_key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_with_verify_full() {
    induction_reconciler::telemetry::install_crypto_provider();
    let pki = make_pki();
    // Only TLS connections are accepted.
    let cluster = PgCluster::init(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        Some("local all all trust\nhostssl all all 127.0.0.1/32 trust\n"),
    );
    cluster.install_file("server.crt", pki.server_cert_pem.as_bytes());
    cluster.install_file("server.key", pki.server_key_pem.as_bytes());
    cluster.start();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let tls_url = cluster.url(
        "postgres",
        &format!("?sslmode=verify-full&sslrootcert={}", ca.display()),
    );

    // The store connects, migrates and reports the session as encrypted.
    let store = Store::connect(
        &SecretString::from(tls_url.clone()),
        Limits::new(2, Duration::from_secs(10)),
    )
    .await
    .expect("TLS connection");
    store.migrate().await.unwrap();
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(ssl);
    store.pool().close().await;

    // The binary (with its own crypto provider set-up) does the same.
    let output = Command::new(BIN)
        .args(["migrate"])
        .env("DATABASE_URL", &tls_url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A certificate from another CA is refused, and so is a connection without TLS.
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, make_pki().ca_pem).unwrap();
    let wrong_ca = cluster.url(
        "postgres",
        &format!("?sslmode=verify-full&sslrootcert={}", other.display()),
    );
    assert!(sqlx::PgConnection::connect(&wrong_ca).await.is_err());
    assert!(
        sqlx::PgConnection::connect(&cluster.url("postgres", "?sslmode=disable"))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_runtime_role_can_run_the_worker_and_nothing_more() {
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let migrator = format!("it_migrator_{suffix}");
    let runtime = format!("it_runtime_{suffix}");
    let sql = |file: &str| {
        std::fs::read_to_string(format!(
            "{}/deploy/postgres/{file}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
        .replace("induction_migrator", &migrator)
        .replace("induction_runtime", &runtime)
    };
    // A fresh database with the shipped roles, migrated by the migrator role.
    let mut app = TestApp::prepare(|_| {}).await;
    let server = admin_url().rsplit_once('/').unwrap().0.to_owned();
    let as_admin = format!("{server}/{}", app.db_name);
    let mut admin = sqlx::PgConnection::connect(&as_admin).await.unwrap();
    // TestApp migrated as root; start from an empty schema so that the migrator owns everything.
    sqlx::raw_sql("drop schema public cascade; create schema public;")
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql("roles.sql")))
        .execute(&mut admin)
        .await
        .unwrap();
    let migrate = Command::new(BIN)
        .args(["migrate"])
        .env(
            "DATABASE_URL",
            format!("postgres://{migrator}@127.0.0.1:5432/{}", app.db_name),
        )
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql("grants.sql")))
        .execute(&mut admin)
        .await
        .unwrap();

    // The worker runs as the runtime role with migrations off.
    let runtime_url = format!("postgres://{runtime}@127.0.0.1:5432/{}", app.db_name);
    app.start_worker_with(|s| {
        s.database.url = SecretString::from(runtime_url.clone());
        s.database.migrate_on_start = false;
    })
    .await;
    app.publish(&registration(1, "r1", "1000001")).await;
    assert_eq!(app.next_outcome().await["status"], "provisional");
    app.publish(&common::claim(2, "ip1", "1000001")).await;
    assert_eq!(app.next_outcome().await["status"], "confirmed");

    // The operator commands run as the same role: `verify` reads everything and records its run.
    let verify = Command::new(BIN)
        .args(["verify", "--differences", "/dev/null"])
        .env("DATABASE_URL", &runtime_url)
        .env("AMQP_URL", common::app::amqp_url())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("checked 1 teachers: 0 differ"));

    // It cannot change the schema or delete history.
    let mut as_runtime = sqlx::PgConnection::connect(&runtime_url).await.unwrap();
    for statement in [
        "drop table history",
        "delete from history",
        "truncate inbox",
        "create table x (y int)",
    ] {
        let error = sqlx::raw_sql(statement)
            .execute(&mut as_runtime)
            .await
            .expect_err(statement);
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert!(
            matches!(code.as_deref(), Some("42501")),
            "{statement}: {error}"
        );
    }
    as_runtime.close().await.ok();
    app.teardown().await;
    for role in [&runtime, &migrator] {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "drop owned by {role}; drop role {role}"
        )))
        .execute(&mut sqlx::PgConnection::connect(&admin_url()).await.unwrap())
        .await;
    }
}
