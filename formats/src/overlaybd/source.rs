//! Random-access byte sources: the one seam between the pure overlaybd readers and storage.

use std::error::Error as StdError;
use std::sync::Arc;

/// Failure to read a range from a [`BlockSource`].
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("read of {len} bytes at offset {offset} is past the end of a {size}-byte source")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("read of {len} bytes at offset {offset} failed")]
    Backend {
        offset: u64,
        len: u64,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

/// A blob (or a decoded view of one) that can be read at any offset.
///
/// Byte slices and vectors implement it for a whole blob; the readers in this module layer
/// decoding on top (tar payload window, ZFile decompression, merged LSMT disk).
pub trait BlockSource {
    /// Total size in bytes.
    fn size(&self) -> u64;

    /// Fills all of `buf` with the bytes starting at `offset`; a short read is an error.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;
}

/// Checks that `len` bytes at `offset` lie within `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), SourceError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(SourceError::OutOfRange { offset, len, size }),
    }
}

impl BlockSource for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(offset, buf.len() as u64, self.size())?;
        // The range check above proves both bounds fit in usize.
        let start = offset as usize;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
}

impl BlockSource for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.as_slice().read_exact_at(offset, buf)
    }
}

impl<S: BlockSource + ?Sized> BlockSource for &S {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).read_exact_at(offset, buf)
    }
}

impl<S: BlockSource + ?Sized> BlockSource for Box<S> {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).read_exact_at(offset, buf)
    }
}

impl<S: BlockSource + ?Sized> BlockSource for Arc<S> {
    fn size(&self) -> u64 {
        (**self).size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        (**self).read_exact_at(offset, buf)
    }
}

/// A sub-range of another source, e.g. the payload inside a tar-wrapped layer blob.
#[derive(Debug, Clone)]
pub struct Window<S> {
    inner: S,
    offset: u64,
    len: u64,
}

impl<S: BlockSource> Window<S> {
    /// Views `len` bytes of `inner` starting at `offset`; the range must lie within `inner`.
    pub fn new(inner: S, offset: u64, len: u64) -> Result<Self, SourceError> {
        check_range(offset, len, inner.size())?;
        Ok(Self { inner, offset, len })
    }

    /// The wrapped source.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: BlockSource> BlockSource for Window<S> {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(offset, buf.len() as u64, self.len)?;
        self.inner.read_exact_at(self.offset + offset, buf)
    }
}

/// Reads `len` bytes at `offset` into a new buffer, refusing ranges the source cannot hold.
pub(crate) fn read_vec<S: BlockSource + ?Sized>(
    source: &S,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, SourceError> {
    // Never allocate for a range the source cannot hold: the length may come from input.
    check_range(offset, len, source.size())?;
    let mut buf = vec![0; len as usize];
    source.read_exact_at(offset, &mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reads_exact_ranges_and_rejects_overruns() {
        let data: Vec<u8> = (0..10).collect();
        let mut buf = [0u8; 3];
        data.read_exact_at(7, &mut buf).unwrap();
        assert_eq!(buf, [7, 8, 9]);
        let err = data.read_exact_at(8, &mut buf).unwrap_err();
        assert!(matches!(
            err,
            SourceError::OutOfRange {
                offset: 8,
                len: 3,
                size: 10
            }
        ));
        assert!(data.read_exact_at(u64::MAX, &mut buf).is_err());
    }

    #[test]
    fn window_shifts_offsets_and_bounds_reads() {
        let data: Vec<u8> = (0..10).collect();
        let window = Window::new(&data, 2, 5).unwrap();
        assert_eq!(window.size(), 5);
        let mut buf = [0u8; 2];
        window.read_exact_at(3, &mut buf).unwrap();
        assert_eq!(buf, [5, 6]);
        assert!(window.read_exact_at(4, &mut buf).is_err());
        assert!(Window::new(&data, 6, 5).is_err());
    }

    #[test]
    fn read_vec_refuses_lengths_past_the_source() {
        let data = vec![1u8; 16];
        assert_eq!(read_vec(&data, 4, 4).unwrap(), vec![1; 4]);
        assert!(read_vec(&data, 0, u64::MAX).is_err());
    }
}
