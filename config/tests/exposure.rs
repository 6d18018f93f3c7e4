//! The peer listener hands out cached layer bytes: without TLS it must stay on loopback
//! unless `insecure = true` asks for more, and the shipped Kubernetes configuration must
//! never listen openly without TLS.

use shoal_config::{Config, ConfigError};

const TLS: &str = "tls = { ca = \"/ca.pem\", cert = \"/n.pem\", key = \"/n.key\" }";

fn section(extra: &str) -> String {
    format!("[peers]\nstatic = [\"10.0.0.2:7420\"]\n{extra}")
}

fn field_of(text: &str) -> String {
    match Config::parse(text).unwrap_err() {
        ConfigError::InvalidValue { field, .. } => field,
        other => panic!("expected InvalidValue, got {other}"),
    }
}

#[test]
fn an_open_listener_without_tls_must_be_asked_for() {
    // The default listener (every address) without TLS is refused, naming the field and
    // the ways out...
    let err = Config::parse(&section("")).unwrap_err();
    assert!(
        matches!(&err, ConfigError::InvalidValue { field, .. } if field == "peers.listen"),
        "{err}"
    );
    assert!(err.to_string().contains("insecure = true"), "{err}");
    assert_eq!(
        field_of(&section("listen = \"10.0.0.2:7420\"")),
        "peers.listen"
    );
    // ...and accepted with TLS, on loopback, or when asked for in so many words.
    assert!(Config::parse(&section(TLS)).is_ok());
    let loopback = Config::parse(&section("listen = \"127.0.0.3:7420\"")).unwrap();
    assert!(!loopback.peers.unwrap().insecure);
    let insecure = Config::parse(&section("insecure = true")).unwrap();
    assert!(insecure.peers.unwrap().insecure);
    assert_eq!(
        field_of(&section(&format!("insecure = true\n{TLS}"))),
        "peers.insecure"
    );
}

#[test]
fn the_index_cap_has_a_floor() {
    assert_eq!(
        field_of(&section("insecure = true\nindex_memory = \"64KiB\"")),
        "peers.index_memory"
    );
    let config = Config::parse(&section("insecure = true\nindex_memory = \"8MiB\"")).unwrap();
    assert_eq!(config.peers.unwrap().index_memory.0, 8 << 20);
}

#[test]
fn the_daemonset_talks_mutual_tls() {
    let manifest = include_str!("../../deploy/kubernetes/shoal.yaml");
    let at = manifest
        .find("config.toml: |\n")
        .expect("the ConfigMap carries config.toml");
    let text: String = manifest[at..]
        .lines()
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    // The node-setup init container puts the node's address in, as here.
    let text = text.replace("@NODE_IP@", "192.0.2.10");
    let config = Config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let peers = config.peers.expect("the DaemonSet shares chunks");
    assert!(peers.tls.is_some() && !peers.insecure, "{text}");
    // Prometheus scrapes the node's address; never every address of the host.
    let metrics = config.metrics.address.expect("Prometheus reads /metrics");
    assert_eq!(metrics.to_string(), "192.0.2.10:9464", "{text}");
}
