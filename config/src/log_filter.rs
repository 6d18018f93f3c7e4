//! `log.level`: what the daemon's log filter accepts, checked when the file is read so that a
//! typo is an error naming the field, not a filter that quietly matches nothing.
//!
//! The syntax is tracing's `EnvFilter`: comma-separated directives, each a level (`info`) or a
//! target with a level (`shoal_fetcher=debug`, `fuser::mnt=error`); span filters
//! (`target[span]=level`) pass through to tracing unchecked.

/// Levels as `EnvFilter` spells them (any case).
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// `Err` with the reason when `filter` holds a directive that is not a level or
/// `target=level`.
pub(crate) fn check(filter: &str) -> Result<(), String> {
    if filter.trim().is_empty() {
        return Err("must not be empty".into());
    }
    for directive in filter.split(',').map(str::trim) {
        if directive.contains('[') {
            continue;
        }
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        if target.is_some_and(str::is_empty) {
            return Err(format!("`{directive}` names no target before `=`"));
        }
        if !LEVELS.iter().any(|known| known.eq_ignore_ascii_case(level)) {
            let hint = match target {
                Some(target) => format!("`{target}=` takes"),
                None => format!("`{directive}` is neither a target with a level nor"),
            };
            return Err(format!("{hint} one of {}", LEVELS.join(", ")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn levels_and_targets_with_levels_pass() {
        for good in [
            "info",
            "DEBUG",
            "info,shoal_fetcher=debug",
            "warn, fuser::mnt=error",
            "off",
            "info,shoal[read]=trace",
        ] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn typos_are_refused_with_what_is_wrong() {
        let error = check("inf").unwrap_err();
        assert!(error.contains("`inf`"), "{error}");
        assert!(
            error.contains("trace, debug, info, warn, error, off"),
            "{error}"
        );
        assert!(check("shoal_fetcher=verbose")
            .unwrap_err()
            .contains("`shoal_fetcher=` takes"));
        assert!(check("=debug").unwrap_err().contains("no target"));
        assert!(check("info,,debug").is_err());
        assert!(check("  ").is_err());
    }
}
