use std::fmt;

/// A byte count written either as an integer or as a string with a binary suffix
/// (`"512KiB"`, `"1MiB"`, `"10GiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"10GiB"`, `"1MiB"`, `"4096"`, `"4K"`; suffixes are powers of 1024.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, suffix) = text.split_at(split);
        let value: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}` is not a byte size such as 512MiB"))?;
        let shift = match suffix.trim() {
            "" | "B" => 0,
            "K" | "KiB" | "KB" => 10,
            "M" | "MiB" | "MB" => 20,
            "G" | "GiB" | "GB" => 30,
            "T" | "TiB" | "TB" => 40,
            other => return Err(format!("unknown size suffix `{other}` in `{text}`")),
        };
        value
            .checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` overflows 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn parses_suffixes() {
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        assert_eq!(ByteSize::parse("1MiB").unwrap().0, 1 << 20);
        assert_eq!(ByteSize::parse("10GiB").unwrap().0, 10 << 30);
        assert!(ByteSize::parse("ten").is_err());
        assert!(ByteSize::parse("1XB").is_err());
        assert!(ByteSize::parse("99999999999TiB").is_err());
    }

    #[test]
    fn displays_human_units() {
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(3 << 20).to_string(), "3.0 MiB");
    }
}
