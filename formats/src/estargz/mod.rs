//! eStargz, the seekable gzip layer format: pure readers and a writer, no I/O of their own.
//!
//! A blob is a concatenation of gzip members that together decompress to a tar stream; each
//! regular file's data starts a new member (one per chunk), the last data member is followed
//! by a member holding the `stargz.index.json` TOC, and a fixed-size [`footer`] points at it.
//!
//! Core types: [`Footer`] ([`parse_footer`]), [`Toc`] / [`TocEntry`] ([`parse_toc`], which
//! also yields the [`TocDigest`]), [`Index`] (the filesystem tree with [`Chunk`] locations),
//! [`decompress_chunk`] / [`verify`] for data, and [`build`] to convert a tar into eStargz.

pub mod build;
pub mod chunk;
pub mod digest;
pub mod entry_name;
pub mod footer;
pub mod index;
pub mod modtime;
pub mod toc;

pub use build::{build, build_with_spill, BuildError, BuildOptions, BuildOutput};
pub use chunk::{decompress_chunk, verify, ChunkError};
pub use digest::{ParseDigestError, Sha256Digest, TocDigest};
pub use footer::{parse_footer, Footer, FooterError, FOOTER_SIZE, LEGACY_FOOTER_SIZE};
pub use index::{
    Attr, Children, Chunk, DirEntry, Index, IndexError, Ino, Node, NodeKind, OpenIndexError,
    Prefetch,
};
pub use toc::{parse_toc, EntryType, ParsedToc, Toc, TocEntry, TocError, TOC_TAR_NAME};

/// Annotation on a layer descriptor holding the [`TocDigest`].
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Annotation holding the layer's uncompressed size (used by containers/storage).
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";
