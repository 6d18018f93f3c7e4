//! [`Extents`]: the valid parts of a blob's partially filled blocks. A foreground read fetches
//! only the bytes it needs; they are written into the block's place in the data file and
//! recorded here, so that later reads of those bytes hit, while the rest of the block is
//! filled in the background. Kept in memory only: after a restart a partial block is absent.

use std::collections::BTreeMap;
use std::ops::Range;

/// Per block index, the sorted, disjoint, non-adjacent byte ranges (blob offsets) written.
#[derive(Debug, Default)]
pub struct Extents {
    blocks: BTreeMap<u64, Vec<Range<u64>>>,
}

impl Extents {
    /// Records `range` (within block `index`) as written, merging it with its neighbours.
    pub fn add(&mut self, index: u64, range: Range<u64>) {
        if range.is_empty() {
            return;
        }
        let extents = self.blocks.entry(index).or_default();
        let mut merged = range;
        extents.retain(|extent| {
            let touches = extent.start <= merged.end && merged.start <= extent.end;
            if touches {
                merged = merged.start.min(extent.start)..merged.end.max(extent.end);
            }
            !touches
        });
        let at = extents.partition_point(|extent| extent.start < merged.start);
        extents.insert(at, merged);
    }

    /// Whether block `index` has every byte of `range` written.
    pub fn covers(&self, index: u64, range: &Range<u64>) -> bool {
        if range.is_empty() {
            return true;
        }
        self.blocks.get(&index).is_some_and(|extents| {
            extents
                .iter()
                .any(|extent| extent.start <= range.start && range.end <= extent.end)
        })
    }

    /// The parts of `span` (block `index`'s bytes) not written yet, in order.
    pub fn gaps(&self, index: u64, span: Range<u64>) -> Vec<Range<u64>> {
        let mut gaps = Vec::new();
        let mut at = span.start;
        for extent in self.blocks.get(&index).into_iter().flatten() {
            if extent.start > at {
                gaps.push(at..extent.start.min(span.end));
            }
            at = at.max(extent.end);
        }
        if at < span.end {
            gaps.push(at..span.end);
        }
        gaps
    }

    /// Forgets block `index`'s extents (it became present, or its bytes were dropped);
    /// whether it had any.
    pub fn remove(&mut self, index: u64) -> bool {
        self.blocks.remove(&index).is_some()
    }

    /// Bytes recorded over every partial block.
    pub fn bytes(&self) -> u64 {
        self.blocks
            .values()
            .flatten()
            .map(|extent| extent.end - extent.start)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_cover_and_leave_gaps() {
        let mut extents = Extents::default();
        extents.add(1, 1_100..1_200);
        extents.add(1, 1_500..1_600);
        assert!(extents.covers(1, &(1_120..1_200)));
        assert!(!extents.covers(1, &(1_150..1_550)), "a hole in between");
        assert!(!extents.covers(2, &(1_120..1_130)), "another block");
        assert_eq!(
            extents.gaps(1, 1_000..2_000),
            vec![1_000..1_100, 1_200..1_500, 1_600..2_000]
        );
        // Adjacent and overlapping ranges join into one.
        extents.add(1, 1_200..1_500);
        extents.add(1, 1_050..1_150);
        assert!(extents.covers(1, &(1_050..1_600)));
        assert_eq!(
            extents.gaps(1, 1_000..2_000),
            vec![1_000..1_050, 1_600..2_000]
        );
        assert_eq!(extents.bytes(), 550);
        extents.add(1, 1_000..2_000);
        assert!(extents.gaps(1, 1_000..2_000).is_empty());
        assert!(extents.remove(1));
        assert!(!extents.remove(1));
        assert_eq!(extents.gaps(1, 1_000..2_000), vec![1_000..2_000]);
        assert_eq!(extents.bytes(), 0);
    }
}
