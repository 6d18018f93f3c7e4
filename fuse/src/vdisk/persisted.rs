//! The bytes a snapshotter keeps for a virtual disk: every layer's verified metadata and block
//! digest table, so the disk reopens after a restart without the registry (and is verified
//! again when it does).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use shoal_fetcher::{BlobRead, BlobRef, Digest, ImageRef, Verification};
use shoal_formats::overlaybd::{BlockDigests, LayerMeta};

use super::checks::{LayerChecks, NO_TABLE};
use super::{DiskLayer, FsType, VirtualDisk};
use crate::error::FsError;

/// Bumped when the encoding changes; older records are refused rather than misread.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct PersistedDisk {
    version: u32,
    fs_type: FsType,
    /// Top layer first.
    layers: Vec<PersistedLayer>,
}

#[derive(Serialize, Deserialize)]
struct PersistedLayer {
    image: String,
    digest: String,
    size: u64,
    payload_offset: u64,
    payload_len: u64,
    #[serde(with = "b64")]
    zfile_header: Vec<u8>,
    #[serde(with = "b64")]
    zfile_trailer: Vec<u8>,
    #[serde(with = "b64")]
    jump_table: Vec<u8>,
    #[serde(with = "b64")]
    lsmt_header: Vec<u8>,
    #[serde(with = "b64")]
    lsmt_trailer: Vec<u8>,
    #[serde(with = "b64")]
    lsmt_index: Vec<u8>,
    /// The layer's block digest table as fetched, checked and used; empty when it has none in
    /// use (a record written before tables existed has none either).
    #[serde(default, with = "b64", skip_serializing_if = "Vec::is_empty")]
    block_digests: Vec<u8>,
    /// Why the layer is checked per blob, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per_blob: Option<String>,
}

impl VirtualDisk {
    /// The disk's metadata as bytes for [`VirtualDisk::from_persisted`].
    pub fn persist(&self) -> Vec<u8> {
        let layers = self
            .layers()
            .iter()
            .map(|layer| {
                let blob = layer.blob();
                let meta = layer.meta().clone();
                let checks = layer.checks();
                let per_blob = match checks.verification() {
                    Verification::PerBlock => None,
                    Verification::PerBlob { why, .. } => Some(why.clone()),
                };
                PersistedLayer {
                    image: blob.image.to_string(),
                    digest: blob.digest.to_string(),
                    size: blob.size,
                    payload_offset: meta.payload_offset,
                    payload_len: meta.payload_len,
                    zfile_header: meta.zfile_header,
                    zfile_trailer: meta.zfile_trailer,
                    jump_table: meta.jump_table,
                    lsmt_header: meta.lsmt_header,
                    lsmt_trailer: meta.lsmt_trailer,
                    lsmt_index: meta.lsmt_index,
                    block_digests: checks.table().map(BlockDigests::encode).unwrap_or_default(),
                    per_blob,
                }
            })
            .collect();
        let persisted = PersistedDisk {
            version: VERSION,
            fs_type: self.fs_type(),
            layers,
        };
        // Plain data with string keys: serialization cannot fail.
        serde_json::to_vec(&persisted).unwrap_or_default()
    }

    /// Reopens a disk from [`VirtualDisk::persist`]'s bytes, verifying every layer's metadata;
    /// its reads are checked as `blobs` now allows.
    pub fn from_persisted(bytes: &[u8], blobs: &dyn BlobRead) -> Result<VirtualDisk, FsError> {
        let persisted: PersistedDisk =
            serde_json::from_slice(bytes).map_err(|source| FsError::PersistedDisk { source })?;
        if persisted.version != VERSION {
            return Err(FsError::PersistedIndex {
                reason: "unknown virtual disk record version",
            });
        }
        let layers = persisted
            .layers
            .into_iter()
            .map(|layer| {
                let image = ImageRef::parse(&layer.image).map_err(|_| FsError::PersistedIndex {
                    reason: "bad image reference",
                })?;
                let digest = Digest::parse(&layer.digest).map_err(|_| FsError::PersistedIndex {
                    reason: "bad layer digest",
                })?;
                let meta = LayerMeta {
                    payload_offset: layer.payload_offset,
                    payload_len: layer.payload_len,
                    zfile_header: layer.zfile_header,
                    zfile_trailer: layer.zfile_trailer,
                    jump_table: layer.jump_table,
                    lsmt_header: layer.lsmt_header,
                    lsmt_trailer: layer.lsmt_trailer,
                    lsmt_index: layer.lsmt_index,
                };
                let table = if layer.block_digests.is_empty() {
                    Err(layer.per_blob.unwrap_or_else(|| NO_TABLE.to_owned()))
                } else {
                    let parsed = BlockDigests::parse(&layer.block_digests, layer.size);
                    Ok(parsed.map_err(|_| FsError::PersistedIndex {
                        reason: "bad block digest table",
                    })?)
                };
                let checks = LayerChecks::new(blobs, table);
                DiskLayer::from_meta(BlobRef::new(image, digest, layer.size), meta, checks)
            })
            .collect::<Result<Vec<_>, _>>()?;
        VirtualDisk::new(layers, persisted.fs_type)
    }
}

mod b64 {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}
