//! `[cri_proxy]`: the CRI image-service proxy kubelet pulls through, so that the credentials
//! of its pull secrets reach Shoal's lazy reads.

use std::path::PathBuf;

use crate::defaults;
use crate::error::ConfigError;
use crate::raw::RawCriProxy;
use crate::resolve::absolute;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriProxyConfig {
    /// The unix socket kubelet's `--image-service-endpoint` names.
    pub listen: PathBuf,
    /// containerd's socket, whose CRI plugin every call is forwarded to.
    pub containerd: PathBuf,
}

pub(crate) fn resolve(raw: RawCriProxy) -> Result<CriProxyConfig, ConfigError> {
    let listen = absolute(
        "cri_proxy.listen",
        raw.listen
            .unwrap_or_else(|| defaults::CRI_PROXY_LISTEN.into()),
    )?;
    let containerd = absolute(
        "cri_proxy.containerd",
        raw.containerd
            .unwrap_or_else(|| defaults::CRI_PROXY_CONTAINERD.into()),
    )?;
    if listen == containerd {
        return Err(ConfigError::invalid(
            "cri_proxy.listen",
            "must differ from `cri_proxy.containerd`: the proxy would forward to itself",
        ));
    }
    Ok(CriProxyConfig { listen, containerd })
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn the_section_turns_the_proxy_on_with_defaults() {
        assert_eq!(Config::parse("").unwrap().cri_proxy, None);
        let proxy = Config::parse("[cri_proxy]\n").unwrap().cri_proxy.unwrap();
        assert_eq!(proxy.listen, std::path::Path::new("/run/shoal/cri.sock"));
        assert_eq!(
            proxy.containerd,
            std::path::Path::new("/run/containerd/containerd.sock")
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let field = |text: &str| match Config::parse(text).unwrap_err() {
            crate::ConfigError::InvalidValue { field, .. } => field,
            other => panic!("{other}"),
        };
        assert_eq!(
            field("[cri_proxy]\nlisten = \"cri.sock\""),
            "cri_proxy.listen"
        );
        assert_eq!(
            field("[cri_proxy]\ncontainerd = \"c.sock\""),
            "cri_proxy.containerd"
        );
        assert_eq!(
            field("[cri_proxy]\nlisten = \"/a\"\ncontainerd = \"/a\""),
            "cri_proxy.listen"
        );
        assert!(Config::parse("[cri_proxy]\nlisen = \"/a\"").is_err());
    }
}
