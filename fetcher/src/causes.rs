//! [`with_causes`]: an error and its chain of causes as one line.

/// `err`'s message followed by its causes', each once, `: `-separated: what a log line or a
/// fallback label shows of an error whose causes are `#[source]`s. A cause an older message
/// already spells out is not repeated.
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        let part = next.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = next.source();
    }
    text
}
