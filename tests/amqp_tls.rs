//! RabbitMQ over TLS, proved rather than configured: a throwaway node with a TLS listener that
//! requires client certificates (certificates generated here), the worker consuming and
//! publishing over `amqps` with `amqp.tls_ca_file` and a client certificate, and the refusals an
//! operator would meet: no client certificate, a server certificate from another CA, a plain
//! connection to the TLS port, and a CA file that holds no certificate.

mod common;

use std::process::Command;
use std::time::Duration;

use common::rabbit::RabbitNode;
use common::{bytes, mid, registration};
use induction_reconciler::broker::{Broker, DEFAULT_RECOVERY, Tls, json_properties};
use induction_reconciler::config::Settings;
use lapin::types::FieldTable;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use secrecy::SecretString;

/// A CA and a certificate it signed for each name given.
struct Ca {
    pem: String,
    issued: Vec<(String, String)>,
}

fn ca(name: &str, subjects: &[&str]) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    let issuer = Issuer::from_params(&params, &key);
    let issued = subjects
        .iter()
        .map(|subject| {
            let leaf_key = KeyPair::generate().unwrap();
            let mut leaf = CertificateParams::new(vec![(*subject).to_owned()]).unwrap();
            leaf.distinguished_name.push(DnType::CommonName, *subject);
            let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
            (leaf_cert.pem(), leaf_key.serialize_pem())
        })
        .collect();
    Ca {
        pem: cert.pem(),
        issued,
    }
}

const CONNECT_BOUND: Duration = Duration::from_secs(20);

async fn connect(url: &str, tls: &Tls) -> Result<Broker, String> {
    let url = SecretString::from(url.to_owned());
    match tokio::time::timeout(
        CONNECT_BOUND,
        Broker::connect_with_tls(&url, "tls test", tls, DEFAULT_RECOVERY),
    )
    .await
    {
        Ok(Ok(broker)) => Ok(broker),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer within 20 s".to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_works_over_mutual_tls_and_wrong_set_ups_are_refused_clearly() {
    induction_reconciler::telemetry::install_crypto_provider();
    let pki = ca(
        "induction-reconciler test CA",
        &["localhost", "induction-reconciler"],
    );
    let other = ca("another CA", &["localhost"]);
    let tls_port = common::free_port();
    let _node = RabbitNode::start_with(|dir| {
        let at = |name: &str| dir.join(name).display().to_string();
        let conf = format!(
            "listeners.ssl.default = {tls_port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n",
            at("ca.pem"),
            at("server.pem"),
            at("server.key"),
        );
        let files = vec![
            ("ca.pem".to_owned(), pki.pem.clone().into_bytes()),
            (
                "server.pem".to_owned(),
                pki.issued[0].0.clone().into_bytes(),
            ),
            (
                "server.key".to_owned(),
                pki.issued[0].1.clone().into_bytes(),
            ),
        ];
        (conf, files)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the TLS listener did not open"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let amqps = format!("amqps://guest:guest@localhost:{tls_port}/%2f");
    let client = (
        pki.issued[1].0.clone().into_bytes(),
        pki.issued[1].1.clone().into_bytes(),
    );
    let good = Tls {
        ca_pem: Some(pki.pem.clone()),
        client: Some(client.clone()),
    };

    // The refusals, each with an error that says what is wrong.
    let no_client_cert = Tls {
        ca_pem: Some(pki.pem.clone()),
        client: None,
    };
    let refused = connect(&amqps, &no_client_cert)
        .await
        .err()
        .expect("refused without a client certificate");
    assert!(!refused.is_empty(), "{refused}");
    let wrong_ca = Tls {
        ca_pem: Some(other.pem.clone()),
        client: Some(client.clone()),
    };
    let refused = connect(&amqps, &wrong_ca)
        .await
        .err()
        .expect("refused with another CA");
    assert!(
        refused.to_lowercase().contains("certificate") || refused.contains("UnknownIssuer"),
        "{refused}"
    );
    let plain = format!("amqp://guest:guest@localhost:{tls_port}/%2f");
    let refused = connect(&plain, &Tls::default())
        .await
        .err()
        .expect("a plain connection to the TLS port is refused");
    assert!(
        refused.contains("amqps://") && !refused.contains("within 20 s"),
        "at once, saying to use TLS: {refused}"
    );

    // The worker over amqps with the CA file and a client certificate.
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, contents: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    };
    let mut settings = Settings::load(None).unwrap();
    settings.amqp.url = SecretString::from(amqps.clone());
    settings.amqp.tls_ca_file = Some(write("ca.pem", pki.pem.as_bytes()));
    settings.amqp.tls_client_cert_file = Some(write("client.pem", &client.0));
    settings.amqp.tls_client_key_file = Some(write("client.key", &client.1));
    settings.topology = common::prefixed_topology("tls");
    let worker = common::LoneWorker::start(settings.clone()).await;
    let producer = connect(&amqps, &good)
        .await
        .expect("a client with the right CA and certificate connects");
    // The worker declares the topology on start; publish once its inbox queue exists (a publish
    // to a missing exchange closes the channel, so each attempt has a new one).
    let message = registration(1, "R-1", "4300001");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let publisher = producer.publisher().await.unwrap();
        let sent = publisher
            .publish(
                &settings.topology.input_exchange,
                "school.registration",
                &bytes(&message),
                json_properties(&mid(1), FieldTable::default()),
            )
            .await;
        if sent.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "could not publish over TLS: {sent:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Consumed (the inbox has it) and its outcome published (the relay marked it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let published: i64 =
            sqlx::query_scalar("select count(*) from outbox where published_at is not null")
                .fetch_one(worker.store.pool())
                .await
                .unwrap();
        if published == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outcome was not published over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    producer.close().await;
    worker.stop().await;

    // check-config refuses a CA file that holds no certificate.
    let empty = write("empty.pem", b"# nothing here\n");
    let out = Command::new(env!("CARGO_BIN_EXE_induction-reconciler"))
        .args(["check-config"])
        .env("INDUCTION__AMQP__TLS_CA_FILE", &empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no PEM certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
