//! Content digests: the `sha256:<hex>` names blobs and manifests go by, and their 32 bytes
//! ([`RawDigest`], `Copy`) where a digest is a key on the read path.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::parse_error::ParseError;

const SHA256_PREFIX: &str = "sha256:";
const SHA256_HEX_LEN: usize = 64;

/// A validated `sha256:<64 lower-case hex>` content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// The 32 bytes of a sha256 digest: copied, hashed and compared without touching the heap,
/// for the keys the hot path builds per block and per chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RawDigest(pub [u8; 32]);

impl Digest {
    /// Parses `sha256:<hex>`; other algorithms are rejected because nothing in the read path
    /// could verify them.
    pub fn parse(text: &str) -> Result<Digest, ParseError> {
        let invalid = |reason: &str| ParseError::ParseDigest {
            text: text.chars().take(100).collect(),
            reason: reason.to_owned(),
        };
        let hex = text
            .strip_prefix(SHA256_PREFIX)
            .ok_or_else(|| invalid("only sha256 digests are supported"))?;
        if hex.len() != SHA256_HEX_LEN {
            return Err(invalid("a sha256 digest has 64 hex digits"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("digits must be lower-case hex"));
        }
        Ok(Digest(text.to_owned()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_raw(RawDigest(Sha256::digest(bytes).into()))
    }

    pub fn from_raw(raw: RawDigest) -> Digest {
        Digest(raw.to_string())
    }

    /// The full `sha256:<hex>` form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The hex digits alone, safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.0[SHA256_PREFIX.len()..]
    }

    /// The digest's bytes, as a `Copy` key. Decoded from the text each time (some tens of
    /// nanoseconds, no allocation): a digest is carried in errors and references, where its
    /// size counts more than this.
    pub fn raw(&self) -> RawDigest {
        let mut raw = [0u8; 32];
        hex::decode_to_slice(self.hex(), &mut raw)
            .expect("a digest holds 64 hex digits, checked when it was made");
        RawDigest(raw)
    }
}

impl FromStr for RawDigest {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<RawDigest, ParseError> {
        Digest::parse(text).map(|digest| digest.raw())
    }
}

impl fmt::Display for RawDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SHA256_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for RawDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form: full digests drown log lines.
        write!(f, "{SHA256_PREFIX}{}…", hex::encode(&self.0[..6]))
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Digest, ParseError> {
        Digest::parse(text)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form: full digests drown log lines.
        write!(f, "{SHA256_PREFIX}{}…", &self.hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hashes() {
        let digest = Digest::of(b"");
        assert_eq!(
            digest.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::parse(digest.as_str()).unwrap(), digest);
        assert_eq!(digest.hex().len(), 64);
        let raw = digest.raw();
        assert_eq!(raw.to_string(), digest.as_str());
        assert_eq!(digest.as_str().parse::<RawDigest>().unwrap(), raw);
        assert_eq!(Digest::from_raw(raw), digest);
        assert_eq!(format!("{raw:?}"), format!("{digest:?}"));
        assert_eq!(format!("{raw:?}"), "sha256:e3b0c44298fc…");
    }

    #[test]
    fn rejects_malformed() {
        let upper = format!("sha256:{}", "A".repeat(64));
        for bad in ["", "sha256:", "sha512:00", "sha256:abc", upper.as_str()] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
        let path = format!("sha256:{}/..", "a".repeat(61));
        assert!(Digest::parse(&path).is_err());
    }
}
