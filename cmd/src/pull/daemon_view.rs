//! Whether the daemon reads the image's registry as this rpull does. rpull resolves the image
//! and downloads what falls back with its own config and flags, the daemon mounts layers with
//! its own: where they differ (another `--config`, `--plain-http`, another docker config, one
//! changed since the daemon read it), layers the daemon cannot read are downloaded instead,
//! silently. The daemon's view is its settings file beside the socket ([`DaemonSettings`]).

use std::path::Path;

use shoal_config::Config;
use shoal_fetcher::CredentialSources;

use crate::reload::settings::HostSettings;
use crate::reload::DaemonSettings;

/// This rpull's view of `host`: the config it read and the flags it was given.
pub struct OwnView<'a> {
    pub config: &'a Config,
    /// As [`config_source`](crate::reload::settings::config_source) names it.
    pub source: String,
    pub credentials: CredentialSources,
    pub plain_http_flag: bool,
}

/// What differs for `host` between this rpull and the daemon, one phrase each.
pub fn differences(own: &OwnView<'_>, daemon: &DaemonSettings, host: &str) -> Vec<String> {
    let mine = HostSettings::from(&own.config.host(host));
    let theirs = daemon.host(host);
    let mut found = Vec::new();
    let flag = if own.plain_http_flag {
        " (--plain-http)"
    } else {
        ""
    };
    if mine.plain_http != theirs.plain_http {
        found.push(format!(
            "plain_http: the daemon {}, this rpull {}{flag}",
            theirs.plain_http, mine.plain_http
        ));
    }
    if mine.insecure_skip_verify != theirs.insecure_skip_verify {
        found.push(format!(
            "insecure_skip_verify: the daemon {}, this rpull {}",
            theirs.insecure_skip_verify, mine.insecure_skip_verify
        ));
    }
    if mine.ca != theirs.ca {
        let show = |ca: &Option<std::path::PathBuf>| {
            ca.as_ref()
                .map_or("none".to_owned(), |path| path.display().to_string())
        };
        found.push(format!(
            "ca: the daemon {}, this rpull {}",
            show(&theirs.ca),
            show(&mine.ca)
        ));
    }
    if mine.mirrors != theirs.mirrors {
        found.push(format!(
            "mirrors: the daemon {:?}, this rpull {:?}",
            theirs.mirrors, mine.mirrors
        ));
    }
    let (mine, theirs) = (&own.credentials, &daemon.credentials);
    let (from_mine, from_theirs) = (mine.for_host(host), theirs.for_host(host));
    if from_mine != from_theirs {
        found.push(format!(
            "credentials: the daemon {from_theirs}, this rpull {from_mine}"
        ));
    } else if mine.docker_config == theirs.docker_config
        && mine.found
        && mine.modified != theirs.modified
    {
        let path = mine.docker_config.as_deref().unwrap_or(Path::new("?"));
        found.push(format!(
            "credentials: the daemon read {} before it last changed",
            path.display()
        ));
    }
    found
}

/// The one warning naming every difference and the fix; none when they agree.
pub fn warning(own: &OwnView<'_>, daemon: &DaemonSettings, host: &str) -> Option<String> {
    let found = differences(own, daemon, host);
    if found.is_empty() {
        return None;
    }
    let config = if own.source == daemon.config {
        format!("both read {}", daemon.config)
    } else {
        format!(
            "the daemon (pid {}) reads {}, this rpull {}",
            daemon.pid, daemon.config, own.source
        )
    };
    Some(format!(
        "warning: the daemon reads registry {host} differently from this rpull ({config}): {}; \
         layers it cannot read are downloaded instead of mounted lazily. Put the same \
         `[registry.hosts.\"{host}\"]` and `registry.docker_config` in {} and run `shoal reload`",
        found.join("; "),
        daemon.config
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon(text: &str) -> DaemonSettings {
        let config = Config::parse(text).unwrap();
        DaemonSettings::of(&config, "/etc/shoal/config.toml".into(), Default::default())
    }

    #[test]
    fn differences_name_the_setting_and_both_sides() {
        const HOST: &str = "r.example:5000";
        let mine =
            Config::parse("[registry.hosts.\"r.example:5000\"]\nplain_http = true\n").unwrap();
        let credentials = shoal_fetcher::Credentials::parse(
            br#"{"auths": {"r.example:5000": {"auth": "dTpw"}}}"#,
        )
        .unwrap()
        .sources();
        let own = OwnView {
            config: &mine,
            source: "/tmp/rpull.toml".into(),
            credentials: credentials.clone(),
            plain_http_flag: true,
        };
        let found = differences(&own, &daemon(""), HOST);
        assert_eq!(
            found,
            [
                "plain_http: the daemon false, this rpull true (--plain-http)",
                "credentials: the daemon none, this rpull docker config"
            ]
        );
        let text = warning(&own, &daemon(""), HOST).unwrap();
        assert!(text.contains("reads /etc/shoal/config.toml, this rpull /tmp/rpull.toml"));
        assert!(
            text.contains("`shoal reload`") && !text.contains("dTpw"),
            "{text}"
        );

        let mut same = daemon("[registry.hosts.\"r.example:5000\"]\nplain_http = true\n");
        same.credentials = credentials;
        assert_eq!(warning(&own, &same, HOST), None);
        assert_eq!(
            differences(&own, &same, "other.example"),
            Vec::<String>::new()
        );
    }
}
