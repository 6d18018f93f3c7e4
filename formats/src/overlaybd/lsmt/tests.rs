use super::*;

const MIB: u64 = 1 << 20;

fn sectors(fill: u8, count: usize) -> Vec<u8> {
    vec![fill; count * SECTOR as usize]
}

#[test]
fn writer_output_parses_back_with_data_and_zeroed_mappings() {
    let a = sectors(0xaa, 3);
    let mut b = sectors(0xbb, 4);
    b[SECTOR as usize..2 * SECTOR as usize].fill(0); // sector 1 of b is all zero
    let file = Writer::new(MIB)
        .uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
        .unwrap()
        .user_tag("test layer")
        .unwrap()
        .write(&[
            Extent {
                offset: 64 * SECTOR,
                data: &b,
            },
            Extent {
                offset: 0,
                data: &a,
            },
        ])
        .unwrap();
    let lsmt = LsmtFile::open(file.as_slice()).unwrap();
    assert_eq!(lsmt.virtual_size(), MIB);
    assert_eq!(lsmt.trailer().uuid, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
    assert_eq!(lsmt.trailer().user_tag, "test layer");
    assert_eq!((lsmt.trailer().version, lsmt.trailer().sub_version), (1, 1));
    assert_eq!(lsmt.index_records(), 256, "index padded to one 4 KiB page");
    let m = lsmt.mappings();
    assert_eq!(m.len(), 4);
    assert_eq!((m[0].offset, m[0].len, m[0].zeroed), (0, 3, false));
    assert_eq!((m[1].offset, m[1].len, m[1].zeroed), (64, 1, false));
    assert_eq!((m[2].offset, m[2].len, m[2].zeroed), (65, 1, true));
    assert_eq!((m[3].offset, m[3].len, m[3].zeroed), (66, 2, false));
    let data_at = |m: &Mapping| (m.moffset * SECTOR) as usize;
    assert_eq!(&file[data_at(&m[0])..data_at(&m[0]) + a.len()], &a[..]);
    assert_eq!(file[data_at(&m[3])], 0xbb);
    // Zero sectors take no space: 3 + 1 + 2 data sectors after the header.
    assert_eq!(lsmt.trailer().index_offset, HEADER_SIZE as u64 + 6 * SECTOR);
}

#[test]
fn long_extents_split_at_the_record_length_limit() {
    let data = sectors(1, MAX_LENGTH as usize + 10);
    let file = Writer::new(64 * MIB)
        .write(&[Extent {
            offset: 0,
            data: &data,
        }])
        .unwrap();
    let lsmt = LsmtFile::open(file.as_slice()).unwrap();
    let lens: Vec<u32> = lsmt.mappings().iter().map(|m| m.len).collect();
    assert_eq!(lens, vec![MAX_LENGTH, 10]);
}

#[test]
fn writer_rejects_bad_extents() {
    let data = sectors(1, 2);
    let w = Writer::new(MIB);
    assert!(matches!(
        w.write(&[Extent {
            offset: 100,
            data: &data
        }]),
        Err(LsmtError::ExtentAlignment { offset: 100, .. })
    ));
    assert!(matches!(
        w.write(&[
            Extent {
                offset: 0,
                data: &data
            },
            Extent {
                offset: SECTOR,
                data: &data
            }
        ]),
        Err(LsmtError::ExtentOverlap { .. })
    ));
    assert!(matches!(
        w.write(&[Extent {
            offset: MIB - SECTOR,
            data: &data
        }]),
        Err(LsmtError::ExtentPastEnd { .. })
    ));
    assert!(Writer::new(MIB).uuid(&"x".repeat(37)).is_err());
}

#[test]
fn empty_layer_round_trips() {
    let file = Writer::new(MIB).write(&[]).unwrap();
    let lsmt = LsmtFile::open(file.as_slice()).unwrap();
    assert!(lsmt.mappings().is_empty());
    assert_eq!(lsmt.index_records(), 0);
}

/// Rewrites the first index record of `file` through `edit`.
fn edit_first_record(file: &mut [u8], edit: impl FnOnce(&mut Mapping)) {
    let trailer = HeaderTrailer::parse(&file[file.len() - HEADER_SIZE..], Record::Trailer).unwrap();
    let at = trailer.index_offset as usize;
    let mut raw = [0u8; RECORD_SIZE];
    raw.copy_from_slice(&file[at..at + RECORD_SIZE]);
    let mut m = Mapping::decode(&raw);
    edit(&mut m);
    file[at..at + RECORD_SIZE].copy_from_slice(&m.encode());
}

#[test]
fn record_pointing_past_the_data_region_is_rejected() {
    let data = sectors(7, 4);
    let mut file = Writer::new(MIB)
        .write(&[Extent {
            offset: 0,
            data: &data,
        }])
        .unwrap();
    edit_first_record(&mut file, |m| m.moffset += 1);
    let err = LsmtFile::open(file.as_slice()).unwrap_err();
    assert!(
        matches!(err, LsmtError::PastDataRegion { record: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("outside the data region"), "{err}");

    edit_first_record(&mut file, |m| m.moffset = 1_000_000);
    assert!(matches!(
        LsmtFile::open(file.as_slice()),
        Err(LsmtError::PastDataRegion { .. })
    ));
}

#[test]
fn record_past_the_virtual_disk_is_rejected() {
    let data = sectors(7, 4);
    let mut file = Writer::new(MIB)
        .write(&[Extent {
            offset: 0,
            data: &data,
        }])
        .unwrap();
    edit_first_record(&mut file, |m| m.offset = MIB / SECTOR - 1);
    assert!(matches!(
        LsmtFile::open(file.as_slice()),
        Err(LsmtError::PastVirtualSize { record: 0, .. })
    ));
}

#[test]
fn truncated_or_mislabelled_files_are_rejected() {
    let data = sectors(7, 4);
    let file = Writer::new(MIB)
        .write(&[Extent {
            offset: 0,
            data: &data,
        }])
        .unwrap();
    for cut in [0, 4096, 8191, file.len() - 1] {
        assert!(LsmtFile::open(&file[..cut]).is_err(), "cut at {cut}");
    }
    let mut swapped = file.clone();
    swapped[28] &= !1; // header no longer says it is a header
    assert!(matches!(
        LsmtFile::open(swapped.as_slice()),
        Err(LsmtError::RecordKind {
            record: Record::Header,
            ..
        })
    ));
    let mut huge = file.clone();
    let at = huge.len() - HEADER_SIZE + 40;
    huge[at..at + 8].copy_from_slice(&(MAX_INDEX_RECORDS + 1).to_le_bytes());
    assert!(matches!(
        LsmtFile::open(huge.as_slice()),
        Err(LsmtError::IndexTooLarge { .. })
    ));
    let mut far = file;
    let at = far.len() - HEADER_SIZE + 32;
    far[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        LsmtFile::open(far.as_slice()),
        Err(LsmtError::IndexRange { .. })
    ));
}
