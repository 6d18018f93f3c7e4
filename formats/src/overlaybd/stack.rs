//! Layer stacking: merges the indexes of up to 255 LSMT layers into one virtual-disk index.
//!
//! Layers are given top first; an upper layer's mapping (data or zeroed) shadows whatever the
//! layers below map at the same sectors. Sectors no layer maps read as zeros.

use std::collections::BTreeMap;

use super::lsmt::{LsmtFile, Mapping, SECTOR};

/// Most layers one stack may hold (layer numbers must fit the reference's 8-bit tag).
pub const MAX_LAYERS: usize = 255;

/// Failure to build or query a layer stack.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StackError {
    #[error("a stack needs at least one layer")]
    NoLayers,
    #[error("{count} layers exceed the stack limit of {MAX_LAYERS}")]
    TooManyLayers { count: usize },
    #[error("range of {len} bytes at {offset} is past the {virtual_size}-byte virtual disk")]
    PastEnd {
        offset: u64,
        len: u64,
        virtual_size: u64,
    },
}

/// Where a run of virtual-disk bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes at byte `moffset` of layer `layer`'s LSMT file (0 = top layer).
    Data {
        layer: usize,
        moffset: u64,
        len: u64,
    },
    /// `len` bytes of zeros (unmapped or zeroed).
    Zero { len: u64 },
}

impl Piece {
    pub fn len(&self) -> u64 {
        match *self {
            Self::Data { len, .. } | Self::Zero { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A visible run of one layer's mapping, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    offset: u64,
    len: u64,
    layer: u8,
    moffset: u64,
    zeroed: bool,
}

impl Segment {
    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The merged index of a layer stack.
#[derive(Debug, Clone)]
pub struct Stack {
    segments: Vec<Segment>,
    layers: usize,
    virtual_size: u64,
}

impl Stack {
    /// Merges parsed LSMT files, top first. The virtual size is the topmost non-zero one.
    pub fn from_files(files: &[&LsmtFile]) -> Result<Self, StackError> {
        let virtual_size = files
            .iter()
            .map(|f| f.virtual_size())
            .find(|&size| size > 0)
            .unwrap_or(0);
        let layers: Vec<&[Mapping]> = files.iter().map(|f| f.mappings()).collect();
        Self::new(&layers, virtual_size)
    }

    /// Merges per-layer mappings (each sorted and disjoint, as [`LsmtFile`] guarantees), top
    /// first, over a virtual disk of `virtual_size` bytes.
    pub fn new(layers: &[&[Mapping]], virtual_size: u64) -> Result<Self, StackError> {
        match layers.len() {
            0 => return Err(StackError::NoLayers),
            count if count > MAX_LAYERS => return Err(StackError::TooManyLayers { count }),
            _ => {}
        }
        let mut painted: BTreeMap<u64, Segment> = BTreeMap::new();
        let mut fresh = Vec::new();
        for (layer, mappings) in layers.iter().enumerate() {
            // Checked above: layer < MAX_LAYERS <= u8::MAX + 1.
            let layer = layer as u8;
            for m in mappings.iter() {
                uncovered(&painted, m, layer, &mut fresh);
            }
            // Pieces of one layer never overlap each other, so insert after the layer.
            painted.extend(fresh.drain(..).map(|s| (s.offset, s)));
        }
        Ok(Self {
            segments: painted.into_values().collect(),
            layers: layers.len(),
            virtual_size,
        })
    }

    /// Size of the virtual disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Number of layers stacked.
    pub fn layer_count(&self) -> usize {
        self.layers
    }

    /// Number of visible segments in the merged index.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Splits virtual bytes `offset..offset + len` into the pieces they are read from.
    pub fn resolve(&self, offset: u64, len: u64) -> Result<Vec<Piece>, StackError> {
        let end = match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size => end,
            _ => {
                return Err(StackError::PastEnd {
                    offset,
                    len,
                    virtual_size: self.virtual_size,
                })
            }
        };
        let mut pieces = Vec::new();
        let first = self
            .segments
            .partition_point(|s| s.end() * SECTOR <= offset);
        let mut cursor = offset;
        for s in self.segments[first..]
            .iter()
            .take_while(|s| s.offset * SECTOR < end)
        {
            let (start, stop) = (s.offset * SECTOR, s.end() * SECTOR);
            if start > cursor {
                push(
                    &mut pieces,
                    Piece::Zero {
                        len: start - cursor,
                    },
                );
                cursor = start;
            }
            let take = stop.min(end) - cursor;
            let piece = if s.zeroed {
                Piece::Zero { len: take }
            } else {
                let moffset = s.moffset * SECTOR + (cursor - start);
                Piece::Data {
                    layer: usize::from(s.layer),
                    moffset,
                    len: take,
                }
            };
            push(&mut pieces, piece);
            cursor += take;
        }
        if cursor < end {
            push(&mut pieces, Piece::Zero { len: end - cursor });
        }
        Ok(pieces)
    }

    /// Every run of virtual bytes backed by layer data, as `(virtual offset, piece)`.
    pub fn data_pieces(&self) -> impl Iterator<Item = (u64, Piece)> + '_ {
        self.segments.iter().filter(|s| !s.zeroed).map(|s| {
            let piece = Piece::Data {
                layer: usize::from(s.layer),
                moffset: s.moffset * SECTOR,
                len: s.len * SECTOR,
            };
            (s.offset * SECTOR, piece)
        })
    }
}

/// Appends to `out` the parts of `m` that no segment in `painted` covers yet.
fn uncovered(painted: &BTreeMap<u64, Segment>, m: &Mapping, layer: u8, out: &mut Vec<Segment>) {
    let (start, end) = (m.offset, m.end());
    let mut cursor = start;
    let mut emit = |from: u64, to: u64| {
        let shift = if m.zeroed { 0 } else { from - start };
        out.push(Segment {
            offset: from,
            len: to - from,
            layer,
            moffset: m.moffset + shift,
            zeroed: m.zeroed,
        });
    };
    // The segment starting before `start` may reach into the mapping.
    if let Some((_, before)) = painted.range(..start).next_back() {
        cursor = cursor.max(before.end());
    }
    for (_, above) in painted.range(start..end) {
        if above.offset > cursor {
            emit(cursor, above.offset);
        }
        cursor = cursor.max(above.end());
    }
    if cursor < end {
        emit(cursor, end);
    }
}

/// Appends a piece, merging it into the previous one when they continue each other.
fn push(pieces: &mut Vec<Piece>, piece: Piece) {
    if piece.is_empty() {
        return;
    }
    match (pieces.last_mut(), piece) {
        (Some(Piece::Zero { len }), Piece::Zero { len: more }) => *len += more,
        (
            Some(Piece::Data {
                layer,
                moffset,
                len,
            }),
            Piece::Data {
                layer: next_layer,
                moffset: next_moffset,
                len: more,
            },
        ) if *layer == next_layer && *moffset + *len == next_moffset => *len += more,
        _ => pieces.push(piece),
    }
}

#[cfg(test)]
mod tests;
