//! Rules of the workspace's structure that a change could silently break: every Kafka client
//! is built by the Kafka layer (`kafka/`), the gateways do not depend on the command router,
//! no product crate spells a topic name (only `schemas` does), and the protocol modules decide
//! nothing the ingest pipeline decides.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The product code: each crate's `src/`, without the load generator (whose raw baselines
/// build their own clients) and without tests.
fn product_sources() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in [
        "src",
        "schemas/src",
        "registry-svc/src",
        "gateways/src",
        "command-router/src",
        "stream-bridge/src",
    ] {
        sources(&root().join(dir), &mut out);
    }
    out
}

#[test]
fn only_the_kafka_layer_builds_kafka_clients() {
    let offenders: Vec<_> = product_sources()
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .contains(concat!("ClientConfig", "::new"))
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "build clients through ferrule-kafka: {offenders:?}"
    );
    let layer = std::fs::read_to_string(root().join("kafka/src/client.rs")).unwrap();
    assert!(layer.contains(concat!("ClientConfig", "::new")));
}

#[test]
fn topic_names_are_spelled_only_in_schemas() {
    let offenders: Vec<_> = product_sources()
        .into_iter()
        .filter(|p| !p.starts_with(root().join("schemas")))
        .filter(|p| {
            std::fs::read_to_string(p).unwrap().lines().any(|l| {
                let code = l.trim_start();
                !code.starts_with("//")
                    && (code.contains("\"hono.") || code.contains("\"ferrule.command_outcome"))
            })
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "name topics through ferrule_schemas::TopicNames: {offenders:?}"
    );
}

#[test]
fn the_gateways_do_not_depend_on_the_command_router() {
    let manifest = std::fs::read_to_string(root().join("gateways/Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .unwrap();
    assert!(deps.contains("ferrule-registry"), "{deps}");
    assert!(!deps.contains("ferrule-command-router"), "{deps}");
}

/// One gate: whether an upload, a subscription or a command response is allowed is decided by
/// the ingest pipeline (and the command hub it hands out), which returns a `Refusal` with its
/// typed `Reason`; the protocol modules only translate their wire format. So none of them
/// names a `Reason` or builds a refusal for a reason of its own choosing (`Refusal::new`); what
/// they may say themselves is what their wire format shows — a malformed packet, missing
/// credentials, a body over the limit, their own bound on requests in flight — through the
/// constructors for exactly those.
#[test]
fn the_protocol_modules_decide_nothing_the_pipeline_decides() {
    let mut files = Vec::new();
    sources(&root().join("gateways/src/mqtt"), &mut files);
    sources(&root().join("gateways/src/coap"), &mut files);
    files.push(root().join("gateways/src/http.rs"));
    assert!(files.len() > 10, "the protocol modules moved: {files:?}");
    let offenders: Vec<String> = files
        .iter()
        .flat_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            text.lines()
                .enumerate()
                .filter(|(_, l)| {
                    let code = l.split("//").next().unwrap_or("");
                    // `Reason::…` (also as `refusal::Reason::…`), not `CloseReason::…`.
                    let names_a_reason =
                        code.match_indices(concat!("Reason", "::")).any(|(i, _)| {
                            !code[..i]
                                .chars()
                                .next_back()
                                .is_some_and(|c| c.is_alphanumeric() || c == '_')
                        });
                    names_a_reason || code.contains(concat!("Refusal", "::new("))
                })
                .map(|(i, l)| format!("{}:{}: {}", p.display(), i + 1, l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "decisions belong in the pipeline (gateways/src/pipeline.rs): {offenders:#?}"
    );
}
