//! The learned-prefetch trace artifact as OCI JSON, and the referrers index it is listed in.
//! Pure: JSON in, JSON out.
//!
//! The artifact is an OCI image manifest with `artifactType` [`TRACE_ARTIFACT_TYPE`], the
//! empty config, one layer per traced layer blob (media type [`TRACE_MEDIA_TYPE`], annotated
//! [`LAYER_ANNOTATION`] = the layer blob's digest, its bytes a `shoal_formats::trace`) and
//! `subject` = the image manifest. One artifact holds all of an image's traces, so a new one
//! supersedes the earlier: [`merge_index`] lists it in place of any earlier trace artifact and
//! keeps every other referrer (signatures, SBOMs, ...) exactly as it was.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// `artifactType` of a trace artifact.
pub const TRACE_ARTIFACT_TYPE: &str = "application/vnd.shoal.trace.v1";
/// Media type of one trace (a layer of the artifact).
pub const TRACE_MEDIA_TYPE: &str = "application/vnd.shoal.trace.v1";
/// The annotation of a trace layer naming the image layer blob it was recorded for.
pub const LAYER_ANNOTATION: &str = "dev.shoal.trace.layer";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub use crate::registry::OCI_INDEX;
/// The spec's empty descriptor, the config of an artifact with no config.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";

/// An OCI content descriptor (the fields this artifact uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: &str, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.to_owned(),
            size,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }
}

/// One trace in an artifact: the layer blob it is for, and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceLayer {
    /// The image layer blob's digest.
    pub blob: String,
    /// The trace blob.
    pub trace: Descriptor,
}

/// A trace artifact as pushed or read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceArtifact {
    pub subject: Descriptor,
    pub traces: Vec<TraceLayer>,
}

/// Why bytes are not a trace artifact (or not a referrers index).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactError {
    #[error("not JSON of the expected shape: {reason}")]
    Parse { reason: String },
    #[error("artifact type is {found:?}, not {TRACE_ARTIFACT_TYPE}")]
    ArtifactType { found: Option<String> },
    #[error("the artifact has no subject")]
    NoSubject,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    subject: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

impl TraceArtifact {
    /// The image manifest bytes (canonical: the same traces give the same digest).
    pub fn encode(&self) -> Vec<u8> {
        let layers: Vec<Descriptor> = self
            .traces
            .iter()
            .map(|layer| {
                let mut trace = layer.trace.clone();
                trace
                    .annotations
                    .insert(LAYER_ANNOTATION.to_owned(), layer.blob.clone());
                trace
            })
            .collect();
        let empty = Descriptor::new(
            EMPTY_MEDIA_TYPE,
            &format!("sha256:{}", sha256_hex(EMPTY_JSON)),
            EMPTY_JSON.len() as u64,
        );
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": TRACE_ARTIFACT_TYPE,
            "config": empty,
            "layers": layers,
            "subject": self.subject,
        });
        serde_json::to_vec(&manifest).expect("a manifest of strings and numbers serializes")
    }

    /// Reads a trace artifact; layers without the layer annotation, or of another media
    /// type, are left out.
    pub fn decode(bytes: &[u8]) -> Result<TraceArtifact, ArtifactError> {
        let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| ArtifactError::Parse {
            reason: e.to_string(),
        })?;
        if raw.artifact_type.as_deref() != Some(TRACE_ARTIFACT_TYPE) {
            return Err(ArtifactError::ArtifactType {
                found: raw.artifact_type,
            });
        }
        let subject = raw.subject.ok_or(ArtifactError::NoSubject)?;
        let traces = raw
            .layers
            .into_iter()
            .filter(|layer| layer.media_type == TRACE_MEDIA_TYPE)
            .filter_map(|mut trace| {
                let blob = trace.annotations.remove(LAYER_ANNOTATION)?;
                Some(TraceLayer { blob, trace })
            })
            .collect();
        Ok(TraceArtifact { subject, traces })
    }

    /// The trace of layer `blob`, if the artifact has one.
    pub fn trace_of(&self, blob: &str) -> Option<&Descriptor> {
        self.traces
            .iter()
            .find(|layer| layer.blob == blob)
            .map(|layer| &layer.trace)
    }
}

/// The descriptors in a referrers index (API answer or tag) whose artifact type is ours,
/// newest (last listed) first.
pub fn trace_referrers(index: &[u8]) -> Result<Vec<Descriptor>, ArtifactError> {
    let manifests = manifests_of(&parse_index(index)?)?;
    let mut found: Vec<Descriptor> = manifests
        .iter()
        .filter(|entry| entry["artifactType"] == TRACE_ARTIFACT_TYPE)
        .filter_map(|entry| serde_json::from_value(entry.clone()).ok())
        .collect();
    found.reverse();
    Ok(found)
}

/// The referrers index after pushing `artifact` (its descriptor, with `artifactType`): read,
/// modified, to be written back. Every entry that is not a trace artifact is kept as it was
/// (unknown fields included), earlier trace artifacts are dropped (the new one holds all
/// traces), and the new one is listed last. `None`: there was no index yet.
pub fn merge_index(index: Option<&[u8]>, artifact: &Descriptor) -> Result<Vec<u8>, ArtifactError> {
    let mut root = match index {
        Some(bytes) => parse_index(bytes)?,
        None => Map::new(),
    };
    let mut manifests = match root.remove("manifests") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            return Err(ArtifactError::Parse {
                reason: "`manifests` is not an array".to_owned(),
            })
        }
    };
    manifests.retain(|entry| {
        entry["artifactType"] != TRACE_ARTIFACT_TYPE && entry["digest"] != artifact.digest.as_str()
    });
    manifests.push(serde_json::to_value(artifact).expect("a descriptor serializes"));
    root.insert("schemaVersion".to_owned(), json!(2));
    root.insert("mediaType".to_owned(), json!(OCI_INDEX));
    root.insert("manifests".to_owned(), Value::Array(manifests));
    Ok(serde_json::to_vec(&Value::Object(root)).expect("JSON values serialize"))
}

fn parse_index(bytes: &[u8]) -> Result<Map<String, Value>, ArtifactError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(root)) => Ok(root),
        Ok(_) => Err(ArtifactError::Parse {
            reason: "an index is a JSON object".to_owned(),
        }),
        Err(e) => Err(ArtifactError::Parse {
            reason: e.to_string(),
        }),
    }
}

fn manifests_of(root: &Map<String, Value>) -> Result<Vec<Value>, ArtifactError> {
    match root.get("manifests") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(entries)) => Ok(entries.clone()),
        Some(_) => Err(ArtifactError::Parse {
            reason: "`manifests` is not an array".to_owned(),
        }),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(traces: &[(&str, &str)]) -> TraceArtifact {
        TraceArtifact {
            subject: Descriptor::new(OCI_MANIFEST, "sha256:aa", 500),
            traces: traces
                .iter()
                .map(|(blob, trace)| TraceLayer {
                    blob: blob.to_string(),
                    trace: Descriptor::new(TRACE_MEDIA_TYPE, trace, 100),
                })
                .collect(),
        }
    }

    fn descriptor(digest: &str, artifact_type: &str) -> Descriptor {
        Descriptor {
            artifact_type: Some(artifact_type.to_owned()),
            ..Descriptor::new(OCI_MANIFEST, digest, 300)
        }
    }

    #[test]
    fn an_artifact_reads_back_as_written_and_says_which_layer_each_trace_is_for() {
        let written = artifact(&[("sha256:l1", "sha256:t1"), ("sha256:l2", "sha256:t2")]);
        let bytes = written.encode();
        assert_eq!(bytes, written.encode(), "the same traces, the same bytes");
        let read = TraceArtifact::decode(&bytes).unwrap();
        assert_eq!(read, written);
        assert_eq!(read.trace_of("sha256:l2").unwrap().digest, "sha256:t2");
        assert!(read.trace_of("sha256:l3").is_none());
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["config"]["mediaType"], EMPTY_MEDIA_TYPE);
        assert_eq!(
            json["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(json["subject"]["digest"], "sha256:aa");
    }

    #[test]
    fn another_artifact_type_or_no_subject_is_not_a_trace_artifact() {
        let signature = br#"{"schemaVersion":2,"artifactType":"application/vnd.dev.cosign","subject":{"mediaType":"m","digest":"sha256:aa","size":1},"layers":[]}"#;
        assert!(matches!(
            TraceArtifact::decode(signature),
            Err(ArtifactError::ArtifactType { .. })
        ));
        let orphan = br#"{"artifactType":"application/vnd.shoal.trace.v1","layers":[]}"#;
        assert_eq!(TraceArtifact::decode(orphan), Err(ArtifactError::NoSubject));
        assert!(matches!(
            TraceArtifact::decode(b"not json"),
            Err(ArtifactError::Parse { .. })
        ));
    }

    #[test]
    fn merging_into_no_index_makes_one_that_lists_the_artifact() {
        let ours = descriptor("sha256:t1", TRACE_ARTIFACT_TYPE);
        let index = merge_index(None, &ours).unwrap();
        let json: Value = serde_json::from_slice(&index).unwrap();
        assert_eq!(json["mediaType"], OCI_INDEX);
        assert_eq!(json["schemaVersion"], 2);
        assert_eq!(trace_referrers(&index).unwrap(), [ours]);
    }

    #[test]
    fn merging_replaces_our_earlier_artifact_and_keeps_every_other_referrer_verbatim() {
        let other = r#"{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:sig","size":9,"artifactType":"application/vnd.dev.cosign","annotations":{"x":"y"},"platform":{"os":"linux"}}"#;
        let earlier = serde_json::to_string(&descriptor("sha256:t1", TRACE_ARTIFACT_TYPE)).unwrap();
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","annotations":{{"keep":"me"}},"manifests":[{earlier},{other}]}}"#
        );
        let newer = descriptor("sha256:t2", TRACE_ARTIFACT_TYPE);
        let merged = merge_index(Some(index.as_bytes()), &newer).unwrap();
        // Twice the same push: still one entry.
        let merged = merge_index(Some(&merged), &newer).unwrap();
        let json: Value = serde_json::from_slice(&merged).unwrap();
        let manifests = json["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 2, "{json}");
        assert_eq!(manifests[0], serde_json::from_str::<Value>(other).unwrap());
        assert_eq!(json["annotations"]["keep"], "me");
        assert_eq!(trace_referrers(&merged).unwrap(), [newer]);
    }

    #[test]
    fn a_damaged_index_is_an_error_not_an_empty_one() {
        let ours = descriptor("sha256:t1", TRACE_ARTIFACT_TYPE);
        for bad in [&b"{"[..], b"[]", br#"{"manifests":{}}"#] {
            assert!(merge_index(Some(bad), &ours).is_err(), "{bad:?}");
            assert!(trace_referrers(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_newest_trace_artifact_of_an_index_comes_first() {
        let a = descriptor("sha256:a", TRACE_ARTIFACT_TYPE);
        let s = descriptor("sha256:s", "application/vnd.dev.cosign");
        let b = descriptor("sha256:b", TRACE_ARTIFACT_TYPE);
        let index = serde_json::to_vec(&json!({"manifests": [a, s, b]})).unwrap();
        assert_eq!(trace_referrers(&index).unwrap(), [b, a]);
    }
}
