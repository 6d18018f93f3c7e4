//! `/proc/self/mountinfo`: one mount a line, its mount point the fifth field, with space, tab,
//! newline and backslash written as octal escapes (`\040`).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// The mount point of every line of a mountinfo table, in order.
pub fn parse_mount_points(table: &[u8]) -> Vec<PathBuf> {
    table
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(OsString::from_vec(unescape(field))))
        .collect()
}

/// Undoes the kernel's `\ooo` escapes; anything else is kept byte for byte.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let code = field
            .get(i + 1..i + 4)
            .filter(|_| field[i] == b'\\')
            .and_then(|digits| {
                digits
                    .iter()
                    .try_fold(0u16, |acc, &d| {
                        (b'0'..=b'7')
                            .contains(&d)
                            .then(|| acc * 8 + u16::from(d - b'0'))
                    })
                    .and_then(|code| u8::try_from(code).ok())
            });
        match code {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[u8] = b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
        97 22 0:45 / /var/lib/shoal/snapshots/3/fs ro,nodev - fuse.shoal shoal:sha256:ab ro\n\
        98 22 0:46 / /tmp/a\\040b\\134c\\011d ro - fuse.shoal x ro\n\
        99 22 0:47 / /tmp/caf\xc3\xa9 ro - tmpfs x ro\n";

    #[test]
    fn mount_points_are_the_fifth_field_unescaped() {
        let points = parse_mount_points(TABLE);
        assert_eq!(
            points,
            [
                PathBuf::from("/"),
                PathBuf::from("/var/lib/shoal/snapshots/3/fs"),
                PathBuf::from("/tmp/a b\\c\td"),
                PathBuf::from("/tmp/café"),
            ]
        );
    }

    #[test]
    fn a_backslash_not_followed_by_three_octal_digits_is_kept() {
        assert_eq!(unescape(br"/a\9bc"), br"/a\9bc");
        assert_eq!(unescape(br"/a\04"), br"/a\04");
        assert_eq!(unescape(br"/a\777"), br"/a\777", "over 255 is no byte");
    }

    #[test]
    fn short_or_empty_lines_are_skipped() {
        assert!(parse_mount_points(b"\n1 2 3\n").is_empty());
    }
}
