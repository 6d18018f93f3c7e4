//! The one version line every binary prints: `shoal 0.1.0 (abc1234)`.

/// The package version and the commit it was built from (`unknown` outside git).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SHOAL_COMMIT"), ")");

/// The commit alone, for `shoal_build_info` and the start-up log line.
pub const COMMIT: &str = env!("SHOAL_COMMIT");

/// What `shoal version`, `shoal --version` and `shoal-snapshotter --version` print.
pub fn line() -> String {
    format!("shoal {VERSION}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_line_names_shoal_the_version_and_a_commit() {
        let line = super::line();
        assert!(line.starts_with(&format!("shoal {} (", env!("CARGO_PKG_VERSION"))));
        assert!(line.ends_with(')'), "{line}");
        assert!(!super::COMMIT.is_empty());
    }
}
