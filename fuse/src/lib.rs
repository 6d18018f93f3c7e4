//! Filesystem layer of Shoal (being built): pure format readers for eStargz and overlaybd.

pub mod estargz;
pub mod overlaybd;
