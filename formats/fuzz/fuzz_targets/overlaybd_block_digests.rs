//! Fuzzes the block digest table parser: the first 8 bytes of the input are the layer's blob
//! size, the rest the table. Any input must yield `Ok` or `Err`, never a panic or an
//! allocation beyond the table's own size; whatever parses encodes back to its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_formats::overlaybd::BlockDigests;

fuzz_target!(|data: &[u8]| {
    let Some((size, table)) = data.split_first_chunk::<8>() else {
        return;
    };
    let blob_size = u64::from_le_bytes(*size);
    if let Ok(parsed) = BlockDigests::parse(table, blob_size) {
        assert_eq!(parsed.encode(), table);
        // The units cover the blob exactly.
        if let Some(last) = (parsed.digests().len() as u64).checked_sub(1) {
            assert_eq!(parsed.unit_range(last).end, blob_size);
        }
    }
});
