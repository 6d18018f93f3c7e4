//! What an overlaybd layer's reads are checked against: its block digest table when the
//! image has one that the fetcher's trust decisions can use ([`Verification::PerBlock`]),
//! else the ZFile CRCs and the whole blob's digest ([`Verification::PerBlob`]). The table is
//! fetched here, checked against the digest the layer's annotation names (the manifest holding
//! that annotation is itself content-addressed), and parsed by `shoal-formats`.

use std::sync::Arc;

use bytes::Bytes;
use shoal_fetcher::{BlobRead, BlobRef, Decode, Expect, Rejection, UnitDigests, Verification};
use shoal_formats::overlaybd::{BlockDigests, BlockDigestsError, TableRef};

/// Why a layer has no block digest table: it was made by another converter.
pub const NO_TABLE: &str = "no block digest table (made by another converter)";

/// Raw blob bytes, presented as they are: the unit digests are the whole check.
fn as_is(raw: &Bytes) -> Result<Bytes, Rejection> {
    Ok(raw.clone())
}

static AS_IS: fn(&Bytes) -> Result<Bytes, Rejection> = as_is;

/// How one layer's reads are checked.
#[derive(Debug, Clone)]
pub struct LayerChecks {
    /// Set only when the reads use it ([`Verification::PerBlock`]).
    table: Option<Arc<BlockDigests>>,
    verification: Verification,
}

impl LayerChecks {
    /// The checks of a layer with `table` (or why it has none that can be had), as the
    /// fetcher's trust decisions allow.
    pub fn new(blobs: &dyn BlobRead, table: Result<BlockDigests, String>) -> LayerChecks {
        let unit = table.as_ref().map(BlockDigests::unit).map_err(Clone::clone);
        let verification = blobs.verification(unit);
        let table = match verification {
            Verification::PerBlock => table.ok().map(Arc::new),
            Verification::PerBlob { .. } => None,
        };
        LayerChecks {
            table,
            verification,
        }
    }

    /// Fetches the table `named` names (peers may send it: it is checked against its digest)
    /// for the layer `blob`, and decides the layer's checks. A table that cannot be had is
    /// no reason not to mount the layer: it is checked per blob instead, saying why.
    pub async fn fetch(
        blobs: &dyn BlobRead,
        blob: &BlobRef,
        named: Option<Result<TableRef, BlockDigestsError>>,
    ) -> LayerChecks {
        let table = match named {
            None => Err(NO_TABLE.to_owned()),
            Some(Err(error)) => Err(format!("block digest table refused: {error}")),
            Some(Ok(named)) => fetch_table(blobs, blob, &named).await,
        };
        if let Err(why) = &table {
            if why != NO_TABLE {
                tracing::warn!(blob = %blob.digest, %why, "overlaybd layer checked per blob only");
            }
        }
        LayerChecks::new(blobs, table)
    }

    pub fn verification(&self) -> &Verification {
        &self.verification
    }

    /// The table, when reads use it.
    pub fn table(&self) -> Option<&BlockDigests> {
        self.table.as_deref()
    }

    /// What ZFile blocks, checked and decoded by `decode`, must match.
    pub fn blocks<'a>(&'a self, decode: &'a dyn Decode) -> Expect<'a> {
        match &self.table {
            Some(table) => Expect::UnitDigests {
                table: units(table),
                decode,
            },
            None => Expect::Embedded(decode),
        }
    }

    /// What ZFile blocks of metadata (the LSMT index, parsed at once and kept) must match:
    /// the table, or their CRCs from the registry alone (peers' blocks are vouched for only
    /// by the blob's digest, later, which could not take back what was kept).
    pub fn kept_blocks<'a>(&'a self, decode: &'a dyn Decode) -> Expect<'a> {
        match &self.table {
            Some(table) => Expect::UnitDigests {
                table: units(table),
                decode,
            },
            None => Expect::EmbeddedKept(decode),
        }
    }

    /// What raw metadata bytes (parsed at once and kept) must match: the table, or only the
    /// whole blob's digest, later (so they come from the registry alone).
    pub fn raw(&self) -> Expect<'_> {
        match &self.table {
            Some(table) => Expect::UnitDigests {
                table: units(table),
                decode: &AS_IS,
            },
            None => Expect::BlobDigest,
        }
    }
}

fn units(table: &BlockDigests) -> UnitDigests<'_> {
    UnitDigests {
        unit: table.unit(),
        digests: table.digests(),
    }
}

async fn fetch_table(
    blobs: &dyn BlobRead,
    layer: &BlobRef,
    named: &TableRef,
) -> Result<BlockDigests, String> {
    let digest = shoal_fetcher::Digest::parse(&named.digest)
        .map_err(|e| format!("block digest table refused: {e}"))?;
    let table_blob = BlobRef::new(layer.image.clone(), digest, named.size);
    let expect = Expect::Sha256 {
        digest: named.sha256,
        decode: &AS_IS,
    };
    let bytes = blobs
        .read(&table_blob, 0..named.size, expect)
        .await
        .map_err(|e| {
            format!(
                "block digest table {} could not be read: {}",
                named.digest,
                shoal_fetcher::with_causes(&e)
            )
        })?;
    BlockDigests::parse(&bytes, layer.size).map_err(|e| format!("block digest table refused: {e}"))
}
