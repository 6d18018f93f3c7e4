//! The memory an eStargz index costs per TOC entry, while it is built and once it is built.
//!
//! Measured in a child process (this test binary run again with [`CHILD`] set), so that no
//! other test shares the heap: the child makes a TOC, resets its peak RSS (`clear_refs`),
//! opens the index and reports its peak and resident set above what it held before. Both are
//! counts of bytes the code allocates, so they do not depend on how busy the machine is.

use std::process::Command;

use shoal_formats::estargz::{Index, Ino};

/// Set in the child to the number of TOC entries it opens.
const CHILD: &str = "SHOAL_INDEX_MEMORY_ENTRIES";
/// Files per directory in the generated TOC.
const PER_DIR: usize = 1000;
const DIGEST: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

/// A TOC of `entries` entries, shaped like a large layer with small files: directories of
/// [`PER_DIR`] files, one file in eight with one chunk of data, one in 64 a symlink.
fn toc_json(entries: usize) -> (Vec<u8>, u64) {
    let mut json = String::with_capacity(entries * 64);
    json.push_str(r#"{"version":1,"entries":["#);
    let mut offset = 0u64;
    let mut dir = 0;
    for i in 0..entries {
        if i > 0 {
            json.push(',');
        }
        if i % (PER_DIR + 1) == 0 {
            dir = i / (PER_DIR + 1);
            json.push_str(&format!(r#"{{"name":"d{dir}/","type":"dir","mode":493}}"#));
        } else if i % 64 == 1 {
            json.push_str(&format!(
                r#"{{"name":"d{dir}/l{i}","type":"symlink","linkName":"f{}"}}"#,
                i + 1
            ));
        } else if i % 8 == 2 {
            offset += 100;
            json.push_str(&format!(
                r#"{{"name":"d{dir}/f{i}","type":"reg","mode":420,"size":1,"offset":{offset},"chunkDigest":"{DIGEST}"}}"#
            ));
        } else {
            json.push_str(&format!(
                r#"{{"name":"d{dir}/f{i}","type":"reg","mode":420}}"#
            ));
        }
    }
    json.push_str("]}");
    (json.into_bytes(), offset + 100)
}

/// A field of `/proc/self/status`, in bytes.
fn status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().unwrap();
    kib * 1024
}

fn open(json: &[u8], toc_offset: u64) -> Index {
    Index::from_toc_json(json, toc_offset).unwrap()
}

/// What the child does: prints `entries json peak resident`, in bytes.
fn child(entries: usize) {
    let (json, toc_offset) = toc_json(entries);
    // "5" resets the peak resident set size to the current one (Linux 4.0 and later).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status("VmRSS");
    let index = open(&json, toc_offset);
    let peak = status("VmHWM") - before;
    let resident = status("VmRSS").saturating_sub(before);
    assert!(index.len() >= entries, "{} inodes", index.len());
    assert!(index.lookup_path("d0/f2").is_some());
    assert!(index.children(Ino::ROOT).is_some());
    println!("index-memory {entries} {} {peak} {resident}", json.len());
}

/// Runs the child for `entries` entries: (json bytes, peak bytes, resident bytes).
fn measure(entries: usize) -> (u64, u64, u64) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_index_costs_little_memory_per_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, entries.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| Some(&l[l.find("index-memory ")? + "index-memory ".len()..]))
        .unwrap_or_else(|| panic!("no measurement in {stdout}"));
    let numbers: Vec<u64> = line.split(' ').map(|n| n.parse().unwrap()).collect();
    (numbers[1], numbers[2], numbers[3])
}

/// Bytes per TOC entry the index may take at its peak while it is built, beyond the JSON it
/// is built from. It takes about 200; before the entries were streamed into compact storage
/// it took about 650 (a full list of decoded entries, then nodes with their own strings and
/// vectors).
const PEAK_PER_ENTRY: u64 = 320;
/// Bytes per TOC entry the built index may keep. It keeps about 85; it kept about 230.
const RESIDENT_PER_ENTRY: u64 = 130;

#[test]
fn an_index_costs_little_memory_per_entry() {
    if let Ok(entries) = std::env::var(CHILD) {
        return child(entries.parse().unwrap());
    }
    // Enough entries that the index dwarfs what the allocator keeps anyway, few enough for a
    // debug build to decode in seconds.
    let entries: u64 = 200_000;
    let (json, peak, resident) = measure(entries as usize);
    eprintln!(
        "{entries} entries, {json} bytes of json: peak {} B/entry, resident {} B/entry",
        peak / entries,
        resident / entries
    );
    assert!(
        peak <= PEAK_PER_ENTRY * entries,
        "building the index took {} bytes per entry at its peak",
        peak / entries
    );
    assert!(
        resident <= RESIDENT_PER_ENTRY * entries,
        "the built index keeps {} bytes per entry",
        resident / entries
    );
}
