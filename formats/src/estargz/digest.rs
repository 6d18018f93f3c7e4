//! `sha256:<hex>` digests as eStargz writes them: TOC digest, file and chunk digests.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

const PREFIX: &str = "sha256:";

/// A SHA-256 digest in OCI form (`sha256:` followed by 64 lower-case hex digits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest([u8; 32]);

/// The digest of the uncompressed TOC JSON; the value of the layer annotation
/// `containerd.io/snapshot/stargz/toc.digest`.
pub type TocDigest = Sha256Digest;

/// A string that is not an OCI sha256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sha256 digest {input:?}: {reason}")]
pub struct ParseDigestError {
    /// The rejected text, truncated to keep error messages bounded.
    pub input: String,
    pub reason: &'static str,
}

impl Sha256Digest {
    /// Hashes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps a finished hasher.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(hasher.finalize().into())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lower-case hex digits without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Sha256Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ParseDigestError {
            input: s.chars().take(80).collect(),
            reason,
        };
        let encoded = s
            .strip_prefix(PREFIX)
            .ok_or_else(|| fail("missing sha256: prefix"))?;
        if encoded.len() != 64 {
            return Err(fail("expected 64 hex digits"));
        }
        // The OCI spec allows only lower-case hex for sha256.
        if !encoded
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(fail("expected lower-case hex digits"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(encoded, &mut bytes).map_err(|_| fail("expected hex digits"))?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips_through_parse() {
        let digest = Sha256Digest::of(b"hello");
        let text = digest.to_string();
        assert_eq!(
            text,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(text.parse::<Sha256Digest>().unwrap(), digest);
    }

    #[test]
    fn rejects_malformed_digests() {
        let good = Sha256Digest::of(b"x").hex();
        for bad in [
            String::new(),
            good.clone(),
            format!("sha512:{good}"),
            format!("sha256:{}", &good[1..]),
            format!("sha256:{}", good.to_uppercase()),
            format!("sha256:{}g", &good[1..]),
        ] {
            assert!(bad.parse::<Sha256Digest>().is_err(), "{bad:?} parsed");
        }
    }
}
