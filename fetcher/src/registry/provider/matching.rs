//! kubelet's `matchImages` patterns: `host[:port][/path]`, a scheme ignored, each dot-separated
//! part of the host a glob (`*` within one part: `*.example.com` matches `a.example.com`, not
//! `a.b.example.com` nor `example.com`), the port equal (both absent, or the same), the
//! image's path starting with the pattern's.

/// Whether `image` (`host[:port]/repository...`, no scheme) matches `pattern`.
pub fn matches(pattern: &str, image: &str) -> bool {
    let pattern = pattern
        .strip_prefix("https://")
        .or_else(|| pattern.strip_prefix("http://"))
        .unwrap_or(pattern);
    let (pattern_host, pattern_path) = split(pattern);
    let (image_host, image_path) = split(image);
    let (pattern_name, pattern_port) = port(pattern_host);
    let (image_name, image_port) = port(image_host);
    if pattern_port != image_port || !image_path.starts_with(pattern_path) {
        return false;
    }
    let pattern_parts: Vec<&str> = pattern_name.split('.').collect();
    let image_parts: Vec<&str> = image_name.split('.').collect();
    pattern_parts.len() == image_parts.len()
        && pattern_parts
            .iter()
            .zip(&image_parts)
            .all(|(glob, part)| glob_matches(glob, part))
}

/// `host[:port]` and the rest from its `/` on.
fn split(text: &str) -> (&str, &str) {
    match text.find('/') {
        Some(at) => (&text[..at], &text[at..]),
        None => (text, ""),
    }
}

fn port(host: &str) -> (&str, Option<&str>) {
    match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    }
}

/// `*` matches any run of characters (none included) within one host part.
fn glob_matches(glob: &str, text: &str) -> bool {
    let Some((head, tail)) = glob.split_once('*') else {
        return glob.eq_ignore_ascii_case(text);
    };
    if text.len() < head.len() || !text[..head.len()].eq_ignore_ascii_case(head) {
        return false;
    }
    let text = &text[head.len()..];
    (0..=text.len())
        .filter(|at| text.is_char_boundary(*at))
        .any(|at| glob_matches(tail, &text[at..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_kubelets_rules() {
        let ecr = "*.dkr.ecr.*.amazonaws.com";
        assert!(matches(
            ecr,
            "123.dkr.ecr.us-east-1.amazonaws.com/team/app:1"
        ));
        assert!(!matches(
            ecr,
            "123.dkr.ecr.us-east-1.amazonaws.com.evil.io/app"
        ));
        assert!(!matches(ecr, "dkr.ecr.us-east-1.amazonaws.com/app"));
        assert!(matches("*.example.com", "a.example.com/app"));
        assert!(!matches("*.example.com", "a.b.example.com/app"));
        assert!(matches("reg.example:5000", "reg.example:5000/app"));
        assert!(!matches("reg.example:5000", "reg.example/app"));
        assert!(!matches("reg.example", "reg.example:5000/app"));
        assert!(matches("https://reg.example/team", "reg.example/team/app"));
        assert!(!matches("reg.example/team", "reg.example/other/app"));
        assert!(
            matches("gcr*.io", "gcr.io/p/app")
                && matches("*-docker.pkg.dev", "us-docker.pkg.dev/p")
        );
    }
}
