//! The deployment files are parsed and checked for the fields that matter, and the RabbitMQ
//! definitions are checked against what the worker itself declares. The Kubernetes manifests are
//! validated offline in strict mode by the tools an operator's pipeline would use.

mod common;

use std::path::{Path, PathBuf};

use induction_reconciler::broker::inbox_arguments;
use induction_reconciler::config::Settings;
use lapin::types::AMQPValue;
use serde_json::Value;

/// The Kubernetes version the manifests are validated against (named in README.md).
const KUBERNETES_VERSION: &str = "1.34.0";

fn validate_manifests(files: &[PathBuf]) -> std::process::Output {
    common::tools::output(
        common::tools::python()
            .arg(common::tools::repo("tests/tools/validate_manifests.py"))
            .arg(KUBERNETES_VERSION)
            .arg(common::tools::repo("tests/tools/crds"))
            .args(files),
    )
}

#[test]
fn every_manifest_passes_strict_schema_validation() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(path("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let out = validate_manifests(&files);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every document was judged by a schema, the ScaledObject by KEDA's own CRD; only the
    // TriggerAuthentication and the PrometheusRule (checked by tests/prometheus.rs), whose CRDs
    // are not vendored, are reported unchecked.
    assert!(
        report.contains("ScaledObject induction-reconciler (against keda.sh_scaledobjects.yaml)"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "Deployment induction-reconciler (Kubernetes {KUBERNETES_VERSION})"
        )),
        "{report}"
    );
    let unchecked: Vec<&str> = report.lines().filter(|l| !l.starts_with("ok ")).collect();
    assert_eq!(unchecked.len(), 2, "{report}");
    assert!(unchecked[0].contains("PrometheusRule"), "{report}");
    assert!(unchecked[1].contains("TriggerAuthentication"), "{report}");
}

#[test]
fn strict_validation_refuses_an_unknown_field_in_a_deployment_and_a_scaled_object() {
    let dir = tempfile::tempdir().unwrap();
    for (name, from, to) in [
        ("deployment.yaml", "  replicas:", "  replica:"),
        ("scaledobject.yaml", "  minReplicaCount:", "  minReplicas:"),
    ] {
        let text = std::fs::read_to_string(path(&format!("kubernetes/{name}"))).unwrap();
        assert!(text.contains(from), "{name} has no {from:?}");
        let broken = dir.path().join(name);
        std::fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let out = validate_manifests(&[broken]);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success(),
            "{name} with {to:?} passed:\n{report}"
        );
        assert!(report.contains("FAILED"), "{report}");
    }
}

fn path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(relative)
}

/// Every YAML document in a file.
fn yaml(relative: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path(relative)).unwrap();
    text.split("\n---\n")
        .filter(|doc| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|doc| {
            serde_saphyr::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{relative}: {e}"))
        })
        .collect()
}

fn one(relative: &str) -> Value {
    let mut docs = yaml(relative);
    assert_eq!(docs.len(), 1, "{relative}");
    docs.remove(0)
}

fn settings_from_configmap() -> Settings {
    let configmap = one("kubernetes/configmap.yaml");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, configmap["data"]["config.toml"].as_str().unwrap()).unwrap();
    Settings::load(Some(&file)).expect("the ConfigMap's settings load")
}

#[test]
fn every_manifest_parses_and_names_its_kind() {
    let dir = path("kubernetes");
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        for doc in yaml(&format!("kubernetes/{name}")) {
            assert!(doc["apiVersion"].is_string(), "{name}");
            assert!(doc["metadata"]["name"].is_string(), "{name}");
            kinds.push(doc["kind"].as_str().unwrap().to_owned());
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "CronJob",
            "Deployment",
            "Job",
            "PodDisruptionBudget",
            "PrometheusRule",
            "ScaledObject",
            "Secret",
            "Service",
            "TriggerAuthentication"
        ]
    );
}

#[test]
fn the_shipped_configuration_names_one_user_per_producer() {
    let settings = settings_from_configmap();
    let p = &settings.publishers;
    assert_eq!(p.school_registration, vec!["school-service"]);
    assert_eq!(p.ab_claim, vec!["ab-service"]);
    assert_eq!(p.operators, vec!["induction-operator"]);
    let compose = one("compose.yaml");
    let env = &compose["services"]["worker"]["environment"];
    assert_eq!(env["INDUCTION__PUBLISHERS__AB_CLAIM"], "ab-service");
    assert_eq!(
        env["INDUCTION__PUBLISHERS__SCHOOL_REGISTRATION"],
        "school-service"
    );
}

/// The shipped lanes get batches, not single messages, and the prefetch fits the container: a
/// prefetch of 32 shared by eight lanes gave batches of about four and drained a backlog at a
/// quarter of the speed (docs/PERFORMANCE.md, "Thirteenth round").
#[test]
fn the_shipped_prefetch_fills_the_lanes_and_fits_the_memory_limit() {
    let settings = settings_from_configmap();
    let deployment = one("kubernetes/deployment.yaml");
    let limit =
        deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
            .as_str()
            .unwrap();
    let limit_mib: usize = limit
        .strip_suffix("Mi")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a memory limit in Mi: {limit}"));
    let (prefetch, lanes) = (
        usize::from(settings.amqp.prefetch),
        settings.amqp.concurrency,
    );
    assert!(
        prefetch / lanes >= 100,
        "prefetch {prefetch} over {lanes} lanes leaves each fewer than 100 messages a batch"
    );
    let worst_mib = prefetch * induction_reconciler::messages::MAX_BODY_BYTES / (1 << 20);
    assert!(
        worst_mib <= limit_mib / 2,
        "{prefetch} deliveries of the largest accepted body are {worst_mib} MiB, over half the \
         container's {limit_mib} MiB"
    );
}

#[test]
fn the_deployment_is_probed_bounded_and_unprivileged() {
    let deployment = one("kubernetes/deployment.yaml");
    let settings = settings_from_configmap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(
        settings.http.listen.ends_with(&format!(":{port}")),
        "the probes reach the configured listener"
    );
    for key in ["requests", "limits"] {
        assert!(container["resources"][key]["memory"].is_string(), "{key}");
        assert!(container["resources"][key]["cpu"].is_string(), "{key}");
    }
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > 2 * settings.worker.shutdown_timeout_seconds,
        "grace {grace}s covers draining and the last flush"
    );
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"],
        "induction-reconciler"
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--no-migrate") && args.contains(&"--no-declare"));
    assert_eq!(
        settings.log.format,
        induction_reconciler::config::LogFormat::Json
    );

    let labels = &deployment["spec"]["selector"]["matchLabels"];
    let pdb = one("kubernetes/pdb.yaml");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert!(pdb["spec"]["minAvailable"].as_u64().unwrap() >= 1);
    assert!(
        deployment["spec"]["replicas"].as_u64().unwrap()
            > pdb["spec"]["minAvailable"].as_u64().unwrap()
    );
}

#[test]
fn keda_scales_the_deployment_on_the_inbox_queue() {
    let docs = yaml("kubernetes/scaledobject.yaml");
    let scaled = docs.iter().find(|d| d["kind"] == "ScaledObject").unwrap();
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"],
        one("kubernetes/deployment.yaml")["metadata"]["name"]
    );
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "rabbitmq");
    assert_eq!(
        trigger["metadata"]["queueName"],
        settings_from_configmap().topology.inbox_queue.as_str()
    );
    let auth = docs
        .iter()
        .find(|d| d["kind"] == "TriggerAuthentication")
        .unwrap();
    assert_eq!(
        auth["metadata"]["name"],
        trigger["authenticationRef"]["name"]
    );
}

fn amqp_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        other => panic!("unexpected argument {other:?}"),
    }
}

#[test]
fn rabbitmq_definitions_match_what_the_worker_declares() {
    let definitions: Value =
        serde_json::from_str(&std::fs::read_to_string(path("rabbitmq/definitions.json")).unwrap())
            .unwrap();
    let t = Settings::load(None).unwrap().topology;
    let queue = |name: &str| {
        definitions["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == name)
            .unwrap_or_else(|| panic!("queue {name}"))
            .clone()
    };
    let declared: serde_json::Map<String, Value> = inbox_arguments(&t)
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), amqp_to_json(v)))
        .collect();
    assert_eq!(queue(&t.inbox_queue)["arguments"], Value::Object(declared));
    for name in [&t.parking_queue, &t.unrouted_queue] {
        assert_eq!(queue(name)["arguments"]["x-queue-type"], "quorum");
    }
    let exchange = |name: &str| {
        definitions["exchanges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(exchange(&t.input_exchange)["type"], "topic");
    assert_eq!(
        exchange(&t.outcome_exchange)["arguments"]["alternate-exchange"],
        t.unrouted_exchange.as_str()
    );
    let keys: Vec<&str> = definitions["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["destination"] == t.inbox_queue.as_str())
        .map(|b| b["routing_key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            t.registration_routing_key.as_str(),
            t.claim_routing_key.as_str()
        ]
    );
    let worker = definitions["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["user"] == "induction-reconciler")
        .unwrap();
    assert_eq!(
        worker["configure"], "^$",
        "a worker with managed topology configures nothing"
    );
    for user in definitions["users"].as_array().unwrap() {
        assert!(
            !user["tags"].as_str().unwrap_or("").contains("impersonator"),
            "{}: no user may forge a user_id",
            user["name"]
        );
    }
    let names: Vec<&str> = definitions["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    let configured = settings_from_configmap().publishers;
    for user in configured
        .school_registration
        .iter()
        .chain(&configured.ab_claim)
        .chain(&configured.operators)
    {
        assert!(names.contains(&user.as_str()), "{user} is a broker user");
    }
}

#[test]
fn the_image_is_multi_stage_and_runs_as_non_root() {
    let dockerfile = std::fs::read_to_string(path("Dockerfile")).unwrap();
    assert_eq!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2
    );
    assert!(dockerfile.lines().any(|l| l.starts_with("USER nonroot")));
    let compose = one("compose.yaml");
    for service in ["postgres", "rabbitmq", "worker"] {
        assert!(compose["services"][service].is_object(), "{service}");
    }
    assert!(
        compose["services"]["rabbitmq"]["image"]
            .as_str()
            .unwrap()
            .ends_with("-management")
    );
}

/// The AsyncAPI document as the AsyncAPI project's parser reads it (tests/tools/parse-asyncapi.mjs).
fn parse_asyncapi(file: &Path) -> std::process::Output {
    common::tools::output(
        common::tools::node("tests/tools")
            .arg("parse-asyncapi.mjs")
            .arg(file),
    )
}

/// The entry of the parser's summary list `list` whose `id` is `id`.
fn by_id<'a>(list: &'a Value, id: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["id"] == id)
        .unwrap_or_else(|| panic!("the AsyncAPI document has no {id}"))
}

#[test]
fn the_asyncapi_document_is_valid_and_names_what_the_worker_uses() {
    let out = parse_asyncapi(&common::tools::repo("docs/contracts/asyncapi.yaml"));
    assert!(
        out.status.success(),
        "@asyncapi/parser refused docs/contracts/asyncapi.yaml:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["warnings"], serde_json::json!([]), "{doc:#}");
    let settings = settings_from_configmap();
    let t = &settings.topology;
    let channel = |id: &str| by_id(&doc["channels"], id);
    let registrations = channel("schoolRegistrations");
    assert_eq!(
        registrations["address"],
        t.registration_routing_key.as_str()
    );
    assert_eq!(registrations["exchange"], t.input_exchange.as_str());
    assert_eq!(registrations["exchange_type"], "topic");
    let claims = channel("abClaims");
    assert_eq!(claims["address"], t.claim_routing_key.as_str());
    assert_eq!(claims["exchange"], t.input_exchange.as_str());
    let outcomes = channel("outcomes");
    assert_eq!(outcomes["address"], "outcome.{status}");
    assert_eq!(outcomes["exchange"], t.outcome_exchange.as_str());
    assert_eq!(outcomes["exchange_type"], "topic");
    assert_eq!(channel("parked")["queue"], t.parking_queue.as_str());
    assert_eq!(channel("unrouted")["queue"], t.unrouted_queue.as_str());

    use induction_reconciler::broker::parking;
    let mut headers: Vec<&str> = channel("parked")["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    headers.sort();
    let mut expected = [
        parking::REASON,
        parking::DETAIL,
        parking::PARKED_AT,
        parking::ORIGINAL_EXCHANGE,
        parking::ORIGINAL_ROUTING_KEY,
        parking::ORIGINAL_USER_ID,
    ];
    expected.sort();
    assert_eq!(headers, expected);

    // The parking reasons it lists are exactly the worker's codes and the broker's own.
    let text =
        std::fs::read_to_string(common::tools::repo("docs/contracts/asyncapi.yaml")).unwrap();
    let mut codes: Vec<&str> = induction_reconciler::messages::ReasonCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    codes.push("delivery_limit");
    let listed = format!("enum: [{}]", codes.join(", "));
    assert!(text.contains(&listed), "asyncapi.yaml lacks {listed}");

    // Its worked examples are valid examples of docs/contracts/examples.json, verbatim.
    let spec: Value = serde_saphyr::from_str(&text).unwrap();
    let shared: Value = serde_json::from_str(
        &std::fs::read_to_string(common::tools::repo("docs/contracts/examples.json")).unwrap(),
    )
    .unwrap();
    let mut worked = 0;
    for message in spec["components"]["messages"].as_object().unwrap().values() {
        for example in message["examples"].as_array().into_iter().flatten() {
            let found = shared["examples"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["message"] == example["payload"])
                .unwrap_or_else(|| panic!("{} is not in examples.json", example["name"]));
            assert_eq!(found["valid"], true, "{}", example["name"]);
            worked += 1;
        }
    }
    assert!(worked >= 2, "{worked} worked examples");

    // Producers publish persistent messages as the users the shipped configuration trusts.
    for (operation, users) in [
        (
            "publishSchoolRegistration",
            &settings.publishers.school_registration,
        ),
        ("publishAbClaim", &settings.publishers.ab_claim),
    ] {
        let op = by_id(&doc["operations"], operation);
        assert_eq!(op["action"], "send");
        assert_eq!(op["amqp"]["deliveryMode"], 2, "{operation}");
        let user = op["amqp"]["userId"].as_str().unwrap();
        assert!(
            users.iter().any(|u| u == user),
            "{operation}: {user} not in {users:?}"
        );
    }
}

#[test]
fn the_asyncapi_parser_refuses_a_broken_document() {
    let text =
        std::fs::read_to_string(common::tools::repo("docs/contracts/asyncapi.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for schema in ["school_registration", "ab_claim", "outcome"] {
        let name = format!("{schema}.schema.json");
        std::fs::copy(
            common::tools::repo(&format!("docs/contracts/{name}")),
            dir.path().join(&name),
        )
        .unwrap();
    }
    // AsyncAPI 2's verb in a 3.0 document.
    let broken = dir.path().join("asyncapi.yaml");
    std::fs::write(&broken, text.replacen("action: send", "action: publish", 1)).unwrap();
    let out = parse_asyncapi(&broken);
    assert!(!out.status.success(), "the parser accepted action: publish");
    assert!(String::from_utf8_lossy(&out.stderr).contains("action"));
}
