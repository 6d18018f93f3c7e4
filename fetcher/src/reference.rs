//! Image and blob references: which registry, which repository, which content.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::parse_error::ParseError;

/// The name Docker Hub goes by in references.
const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually answers.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
const DEFAULT_TAG: &str = "latest";
const MAX_REPOSITORY_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed `host[:port]/repository[:tag][@digest]` image reference.
///
/// Docker Hub's shorthands are expanded: `busybox` is `docker.io/library/busybox:latest`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    host: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageRef {
    pub fn parse(text: &str) -> Result<ImageRef, ParseError> {
        let invalid = |reason: &str| ParseError::ParseReference {
            text: text.chars().take(300).collect(),
            reason: reason.to_owned(),
        };
        let (name, digest) = match text.split_once('@') {
            Some((name, digest)) => (name, Some(Digest::parse(digest)?)),
            None => (text, None),
        };
        // A tag is a `:` after the last `/`; an earlier `:` belongs to a host's port.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].find(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        let (host, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first, rest.to_owned())
            }
            _ => (DOCKER_HUB, name.to_owned()),
        };
        let host = match host {
            "index.docker.io" | DOCKER_HUB_API => DOCKER_HUB,
            other => other,
        };
        let repository = if host == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if !valid_host(host) {
            return Err(invalid("host must be `name[:port]`"));
        }
        if !valid_repository(&repository) {
            return Err(invalid(
                "repository components are lower-case letters, digits and `._-`",
            ));
        }
        if let Some(tag) = tag {
            if !valid_tag(tag) {
                return Err(invalid(
                    "a tag is 1-128 of `A-Za-z0-9_.-`, not starting with `.-`",
                ));
            }
        }
        Ok(ImageRef {
            host: host.to_owned(),
            repository,
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    /// A reference to `repository` on `host` with no tag or digest, as blob references need.
    pub fn repository(host: &str, repository: &str) -> Result<ImageRef, ParseError> {
        ImageRef::parse(&format!("{host}/{repository}"))
    }

    /// This repository's `tag`.
    pub fn with_tag(&self, tag: &str) -> Result<ImageRef, ParseError> {
        ImageRef::parse(&format!("{}/{}:{tag}", self.host, self.repository))
    }

    /// This repository's manifest `digest`.
    pub fn with_digest(&self, digest: &Digest) -> ImageRef {
        ImageRef {
            host: self.host.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.clone()),
        }
    }

    /// The registry as named in references and in the `registry.hosts` configuration.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host the registry API is served from.
    pub fn api_host(&self) -> &str {
        if self.host == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.host
        }
    }

    pub fn repository_name(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What the manifest endpoint is asked for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.as_str(),
            (None, Some(tag)) => tag,
            (None, None) => DEFAULT_TAG,
        }
    }
}

impl FromStr for ImageRef {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<ImageRef, ParseError> {
        ImageRef::parse(text)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One blob of an image: where it lives, its digest and its size from the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlobRef {
    /// Registry and repository; tag and digest of the image are not used.
    pub image: ImageRef,
    pub digest: Digest,
    pub size: u64,
}

impl BlobRef {
    pub fn new(image: ImageRef, digest: Digest, size: u64) -> BlobRef {
        BlobRef {
            image,
            digest,
            size,
        }
    }
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

fn valid_repository(repository: &str) -> bool {
    repository.len() <= MAX_REPOSITORY_LEN
        && repository.split('/').all(|component| {
            let bytes = component.as_bytes();
            !bytes.is_empty()
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && bytes.iter().all(|&b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        })
}

fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    (1..=MAX_TAG_LEN).contains(&bytes.len())
        && !matches!(bytes[0], b'.' | b'-')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_shorthands_expand() {
        let image = ImageRef::parse("busybox").unwrap();
        assert_eq!(image.host(), "docker.io");
        assert_eq!(image.api_host(), "registry-1.docker.io");
        assert_eq!(image.repository_name(), "library/busybox");
        assert_eq!(image.manifest_reference(), "latest");
        assert_eq!(image.to_string(), "docker.io/library/busybox");

        let image = ImageRef::parse("docker.io/user/app:v1").unwrap();
        assert_eq!(image.repository_name(), "user/app");
        assert_eq!(image.tag(), Some("v1"));
    }

    #[test]
    fn host_port_tag_and_digest() {
        let digest = Digest::of(b"x");
        let text = format!("127.0.0.1:5000/team/app:1.0@{digest}");
        let image = ImageRef::parse(&text).unwrap();
        assert_eq!(image.host(), "127.0.0.1:5000");
        assert_eq!(image.api_host(), "127.0.0.1:5000");
        assert_eq!(image.repository_name(), "team/app");
        assert_eq!(image.tag(), Some("1.0"));
        assert_eq!(image.manifest_reference(), digest.as_str());
        assert_eq!(image.to_string(), text);

        let image = ImageRef::parse("localhost/app").unwrap();
        assert_eq!(image.host(), "localhost");
        let image = ImageRef::parse("registry:5000/app").unwrap();
        assert_eq!(image.host(), "registry:5000");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "Upper/Case",
            "host.io/",
            "host.io/app:",
            "host.io/app:-x",
            "host.io//app",
            "app@sha256:zz",
            "host io/app",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
