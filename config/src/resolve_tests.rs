use super::*;

fn field_of(text: &str) -> String {
    match Config::parse(text).unwrap_err() {
        ConfigError::InvalidValue { field, .. } => field,
        other => panic!("expected InvalidValue, got {other}"),
    }
}

#[test]
fn empty_file_gives_defaults() {
    let config = Config::parse("").unwrap();
    assert_eq!(config.root, Path::new(defaults::ROOT));
    assert_eq!(config.socket, Path::new(defaults::SOCKET));
    assert_eq!(config.cache.block_size.0, 1 << 20);
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.registry.deadline.as_secs(), 60);
}

#[test]
fn example_config_parses() {
    let text = include_str!("../example.toml");
    let config = Config::parse(text).unwrap();
    assert_eq!(config.root, Path::new("/var/lib/shoal"));
    assert!(config.registry.hosts.contains_key("127.0.0.1:5000"));
    assert!(config.host("127.0.0.1:5000").plain_http);
    // `[peers]` ships commented out (installing the example must not open a port); its
    // keys are checked by parsing the section uncommented.
    assert!(config.peers.is_none());
    let at = text
        .find("# [peers]")
        .expect("the example documents [peers]");
    let peers: String = text[at..]
        .lines()
        .map(|line| line.strip_prefix("# ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    let peers = Config::parse(&peers).unwrap().peers.unwrap();
    assert_eq!(peers.latency_budget.as_millis(), 2000);
    assert_eq!(peers.static_peers.len(), 2);
    assert!(peers.tls.is_some());
    // The credential provider keys too, in place.
    assert!(config.registry.credential_providers.is_none());
    let providers = text
        .replace("# credential_provider_config", "credential_provider_config")
        .replace(
            "# credential_provider_bin_dir",
            "credential_provider_bin_dir",
        );
    let providers = Config::parse(&providers)
        .unwrap()
        .registry
        .credential_providers
        .expect("the example documents the credential providers");
    assert_eq!(
        providers.config,
        Path::new("/etc/kubernetes/credential-provider.yaml")
    );
    // So does `[cri_proxy]`, up to the blank line that ends it.
    assert!(config.cri_proxy.is_none());
    let at = text
        .find("# [cri_proxy]")
        .expect("the example documents [cri_proxy]");
    let proxy: String = text[at..]
        .lines()
        .take_while(|line| !line.is_empty())
        .map(|line| line.strip_prefix("# ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n");
    let proxy = Config::parse(&proxy).unwrap().cri_proxy.unwrap();
    assert_eq!(proxy.listen, Path::new(defaults::CRI_PROXY_LISTEN));
    // And `[preheat]`, up to the blank line that ends it, its credentials uncommented.
    assert!(config.preheat.is_none());
    let at = text
        .find("# [preheat]")
        .expect("the example documents [preheat]");
    let section: Vec<String> = text[at..]
        .lines()
        .take_while(|line| !line.is_empty())
        .map(|line| line.trim_start_matches('#').trim_start().to_owned())
        .collect();
    let bearer: Vec<&str> = section
        .iter()
        .map(String::as_str)
        .filter(|line| !line.starts_with("username") && !line.starts_with("password"))
        .collect();
    let preheat = Config::parse(&bearer.join("\n")).unwrap().preheat.unwrap();
    assert_eq!(preheat.listen.to_string(), defaults::PREHEAT_LISTEN);
    assert!(matches!(preheat.auth, crate::PreheatAuth::Bearer(_)));
    let basic: Vec<&str> = section
        .iter()
        .map(String::as_str)
        .filter(|line| !line.starts_with("token"))
        .collect();
    let preheat = Config::parse(&basic.join("\n")).unwrap().preheat.unwrap();
    assert!(matches!(preheat.auth, crate::PreheatAuth::Basic { .. }));
}

#[test]
fn credential_providers_need_both_paths() {
    let one = "[registry]\ncredential_provider_config = \"/etc/k/p.yaml\"";
    assert_eq!(field_of(one), "registry.credential_provider_config");
    let relative = "[registry]\ncredential_provider_config = \"p.yaml\"\n\
                    credential_provider_bin_dir = \"/bin\"";
    assert_eq!(field_of(relative), "registry.credential_provider_config");
}

#[test]
fn unknown_keys_are_rejected() {
    // The message says what failed; its source says where and why, once.
    let cause = |err: ConfigError| {
        assert_eq!(err.to_string(), "parse config");
        std::error::Error::source(&err).unwrap().to_string()
    };
    let err = cause(Config::parse("rooot = \"/x\"").unwrap_err());
    assert!(err.contains("rooot"), "{err}");
    let err = cause(Config::parse("[cache]\nsize = 3").unwrap_err());
    assert!(err.contains("size"), "{err}");
}

#[test]
fn read_triggered_completion_is_a_share_of_the_layer_and_zero_turns_it_off() {
    let default = Config::parse("").unwrap();
    assert_eq!(default.fetch.complete_after_percent, None);
    let half = Config::parse("[fetch]\ncomplete_after_percent = 50").unwrap();
    assert_eq!(half.fetch.complete_after_percent, Some(50));
    let off = Config::parse("[fetch]\ncomplete_after_percent = 0").unwrap();
    assert_eq!(off.fetch.complete_after_percent, None);
    let all = Config::parse("[fetch]\ncomplete_after_percent = 100").unwrap();
    assert_eq!(all.fetch.complete_after_percent, Some(100));
    for bad in ["101", "-1"] {
        assert_eq!(
            field_of(&format!("[fetch]\ncomplete_after_percent = {bad}")),
            "fetch.complete_after_percent"
        );
    }
}

#[test]
fn invalid_values_name_their_field() {
    assert_eq!(field_of("root = \"relative\""), "root");
    assert_eq!(field_of("[log]\nformat = \"xml\""), "log.format");
    assert_eq!(field_of("[cache]\nblock_size = 1000"), "cache.block_size");
    assert_eq!(
        field_of("[cache]\nblock_size = \"1Mib\""),
        "cache.block_size"
    );
    assert_eq!(field_of("[cache]\ncapacity = 10"), "cache.capacity");
    assert_eq!(
        field_of("[fetch]\nmax_concurrent = 0"),
        "fetch.max_concurrent"
    );
    assert_eq!(field_of("[registry]\nretries = -1"), "registry.retries");
    assert_eq!(
        field_of("[registry]\ndeadline_secs = 0"),
        "registry.deadline_secs"
    );
    assert_eq!(
        field_of("[metrics]\naddress = \"localhost\""),
        "metrics.address"
    );
    assert_eq!(
        field_of("[registry.hosts.\"r:5000\"]\nmirrors = [\"http://m\"]"),
        "registry.hosts.\"r:5000\".mirrors"
    );
}

#[test]
fn peers_are_off_unless_configured() {
    assert!(Config::parse("").unwrap().peers.is_none());
    let config =
        Config::parse("[peers]\nlisten = \"127.0.0.2:7420\"\nstatic = [\"127.0.0.2:7420\"]")
            .unwrap();
    let peers = config.peers.unwrap();
    assert_eq!(peers.owners, defaults::PEERS_OWNERS);
    assert_eq!(peers.static_peers, ["127.0.0.2:7420"]);
    assert_eq!(peers.index_memory.0, defaults::PEERS_INDEX_MEMORY);
    assert!(peers.tls.is_none() && !peers.insecure);
}

#[test]
fn invalid_peers_name_their_field() {
    assert_eq!(
        field_of("[peers]\nlisten = \"127.0.0.1:1\""),
        "peers.static"
    );
    assert_eq!(field_of("[peers]\nstatic = [\"10.0.0.2\"]"), "peers.static");
    assert_eq!(field_of("[peers]\ndns = \"svc\""), "peers.dns");
    assert_eq!(
        field_of("[peers]\ndns = \"svc:1\"\nlisten = \"x\""),
        "peers.listen"
    );
    assert_eq!(
        field_of("[peers]\ndns = \"svc:1\"\nowners = 0"),
        "peers.owners"
    );
    assert_eq!(
        field_of("[peers]\ndns = \"svc:1\"\ntls = { ca = \"/ca.pem\" }"),
        "peers.tls.cert"
    );
}

#[test]
fn byte_sizes_accept_suffixes() {
    let config = Config::parse("[cache]\ncapacity = \"2GiB\"\nblock_size = \"512KiB\"").unwrap();
    assert_eq!(config.cache.capacity.0, 2 << 30);
    assert_eq!(config.cache.block_size.0, 512 << 10);
}
