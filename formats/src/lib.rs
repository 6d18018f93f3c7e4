//! Format layer of Shoal: the layer formats as pure readers and writers, bytes in and
//! structures out, with no FUSE, no runtime and no network (fuzzed; see `fuzz/`).
//!
//! - [`estargz`]: [`estargz::Footer`], [`estargz::Toc`] and the file [`estargz::Index`] with
//!   its [`estargz::Chunk`] locations, chunk decoding, and the builder used by `shoal convert`.
//! - [`overlaybd`]: the tar wrapper, [`overlaybd::ZFile`] (compressed, CRC-checked blocks),
//!   [`overlaybd::LsmtFile`] (sector index), the merged [`overlaybd::Stack`] and the reference
//!   [`overlaybd::Disk`] reader over any [`overlaybd::BlockSource`].
//! - [`trace`]: learned-prefetch traces (the chunks an image's first start read from a layer),
//!   versioned and checksummed.
//!
//! Architecture Invariant: depends on no other Shoal crate; the FUSE filesystems and
//! `shoal convert` depend on it, never the other way round.

pub mod estargz;
pub mod overlaybd;
pub mod trace;
