//! `[preheat]`: the HTTP API that warms the cluster with an image before a rollout (the
//! subset of Dragonfly manager's open API Harbor's Dragonfly provider calls, which
//! `shoal preheat` calls too). Jobs carry registry credentials and make the node fetch
//! whole images, so a listener other hosts can reach must ask its callers for a credential.

use std::net::SocketAddr;

use crate::defaults;
use crate::error::ConfigError;
use crate::raw::RawPreheat;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreheatConfig {
    /// Where the API listens (HTTP/1.1, JSON).
    pub listen: SocketAddr,
    /// What each request must carry, as Harbor's instance auth modes send it.
    pub auth: PreheatAuth,
}

/// What a caller of the preheat API must send.
#[derive(Clone, PartialEq, Eq)]
pub enum PreheatAuth {
    /// Nothing (Harbor's auth mode `NONE`): loopback listeners only.
    None,
    /// `Authorization: Bearer <token>` (Harbor's `OAUTH` mode, its data `{"token": ...}`).
    Bearer(String),
    /// `Authorization: Basic` with this user and password (Harbor's `BASIC` mode).
    Basic { username: String, password: String },
}

impl std::fmt::Debug for PreheatAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never let a secret reach a log line.
        match self {
            PreheatAuth::None => f.write_str("None"),
            PreheatAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            PreheatAuth::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
        }
    }
}

pub(crate) fn resolve(raw: RawPreheat) -> Result<PreheatConfig, ConfigError> {
    let text = raw
        .listen
        .unwrap_or_else(|| defaults::PREHEAT_LISTEN.to_owned());
    let listen: SocketAddr = text.parse().map_err(|_| {
        ConfigError::invalid(
            "preheat.listen",
            format!("`{text}` is not an address such as 127.0.0.1:7430"),
        )
    })?;
    let auth = match (raw.token, raw.username, raw.password) {
        (None, None, None) => PreheatAuth::None,
        (Some(token), None, None) if !token.trim().is_empty() => PreheatAuth::Bearer(token),
        (Some(_), None, None) => {
            return Err(ConfigError::invalid("preheat.token", "must not be empty"))
        }
        (Some(_), _, _) => {
            return Err(ConfigError::invalid(
                "preheat.token",
                "set either `token` or `username` and `password`, not both",
            ))
        }
        (None, Some(username), Some(password))
            if !username.is_empty() && !username.contains(':') && !password.is_empty() =>
        {
            PreheatAuth::Basic { username, password }
        }
        (None, Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                "preheat.username",
                "needs a non-empty `username` without `:` and a non-empty `password`",
            ))
        }
        (None, None, Some(_)) => {
            return Err(ConfigError::invalid(
                "preheat.username",
                "`password` needs a `username`",
            ))
        }
        (None, Some(_), None) => {
            return Err(ConfigError::invalid(
                "preheat.password",
                "`username` needs a `password`",
            ))
        }
    };
    if auth == PreheatAuth::None && !listen.ip().is_loopback() {
        return Err(ConfigError::invalid(
            "preheat.listen",
            format!(
                "{listen} is not on loopback: anyone who reaches it could make this node fetch \
                 images; set `token` (or `username` and `password`), or listen on loopback"
            ),
        ));
    }
    Ok(PreheatConfig { listen, auth })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn field_of(text: &str) -> String {
        match Config::parse(text).unwrap_err() {
            ConfigError::InvalidValue { field, .. } => field,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn the_section_turns_the_api_on_on_loopback() {
        assert_eq!(Config::parse("").unwrap().preheat, None);
        let preheat = Config::parse("[preheat]\n").unwrap().preheat.unwrap();
        assert_eq!(preheat.listen.to_string(), defaults::PREHEAT_LISTEN);
        assert_eq!(preheat.auth, PreheatAuth::None);
    }

    #[test]
    fn credentials_resolve_and_stay_out_of_debug() {
        let bearer = Config::parse("[preheat]\nlisten = \"0.0.0.0:7430\"\ntoken = \"s3cret\"")
            .unwrap()
            .preheat
            .unwrap();
        assert_eq!(bearer.auth, PreheatAuth::Bearer("s3cret".into()));
        assert!(!format!("{bearer:?}").contains("s3cret"));
        let basic = Config::parse(
            "[preheat]\nlisten = \"10.0.0.1:7430\"\nusername = \"harbor\"\npassword = \"pw\"",
        )
        .unwrap()
        .preheat
        .unwrap();
        assert_eq!(
            basic.auth,
            PreheatAuth::Basic {
                username: "harbor".into(),
                password: "pw".into()
            }
        );
        assert!(!format!("{basic:?}").contains("pw"));
    }

    #[test]
    fn bad_values_name_their_field() {
        assert_eq!(
            field_of("[preheat]\nlisten = \"nowhere\""),
            "preheat.listen"
        );
        // Reachable from other hosts without a credential.
        assert_eq!(
            field_of("[preheat]\nlisten = \"0.0.0.0:7430\""),
            "preheat.listen"
        );
        assert_eq!(field_of("[preheat]\ntoken = \" \""), "preheat.token");
        assert_eq!(
            field_of("[preheat]\ntoken = \"t\"\nusername = \"u\"\npassword = \"p\""),
            "preheat.token"
        );
        assert_eq!(field_of("[preheat]\nusername = \"u\""), "preheat.password");
        assert_eq!(field_of("[preheat]\npassword = \"p\""), "preheat.username");
        assert_eq!(
            field_of("[preheat]\nusername = \"a:b\"\npassword = \"p\""),
            "preheat.username"
        );
        assert!(Config::parse("[preheat]\nlisen = \"127.0.0.1:1\"").is_err());
    }
}
