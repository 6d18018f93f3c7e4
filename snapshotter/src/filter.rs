//! containerd's filter syntax, as used by `ctr snapshots ls` and the remote-snapshot handshake.
//!
//! A filter is a comma-separated conjunction of selectors `fieldpath [op value]`, where a field
//! path is dot-separated, each element a bare word or a quoted string (`labels."a.b/c"`), `op` is
//! `==`, `!=` or `~=` (regular expression) and a selector without an operator tests presence.
//! Several filters are OR'ed. As in containerd, presence and `==` need the field to exist, while
//! `!=` and `~=` compare a missing field as the empty string.

use regex::Regex;

use crate::error::SnapshotError;

/// Something a filter can be evaluated against.
pub trait Fields {
    /// The value at `path`, or `None` when the field is absent.
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug)]
enum Operator {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    operator: Operator,
}

/// A parsed filter set: matches when any filter matches (or when there are none).
#[derive(Debug, Default)]
pub struct Filter {
    any_of: Vec<Vec<Selector>>,
}

impl Filter {
    pub fn parse_all(filters: &[String]) -> Result<Filter, SnapshotError> {
        let mut any_of = Vec::new();
        for text in filters {
            let selectors =
                Parser::new(text)
                    .parse()
                    .map_err(|reason| SnapshotError::InvalidFilter {
                        filter: text.clone(),
                        reason,
                    })?;
            if selectors.is_empty() {
                // containerd treats an empty filter as "always".
                return Ok(Filter::default());
            }
            any_of.push(selectors);
        }
        Ok(Filter { any_of })
    }

    pub fn matches(&self, subject: &impl Fields) -> bool {
        self.any_of.is_empty()
            || self
                .any_of
                .iter()
                .any(|all| all.iter().all(|selector| selector.matches(subject)))
    }
}

impl Selector {
    fn matches(&self, subject: &impl Fields) -> bool {
        let value = subject.field(&self.path);
        match &self.operator {
            Operator::Present => value.is_some(),
            Operator::Equal(expected) => value.as_ref() == Some(expected),
            Operator::NotEqual(expected) => value.unwrap_or_default() != *expected,
            Operator::Matches(re) => re.is_match(&value.unwrap_or_default()),
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser { text, pos: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    fn parse(mut self) -> Result<Vec<Selector>, String> {
        let mut selectors = Vec::new();
        self.skip_space();
        if self.peek().is_none() {
            return Ok(selectors);
        }
        loop {
            selectors.push(self.selector()?);
            self.skip_space();
            match self.bump() {
                None => return Ok(selectors),
                Some(',') => continue,
                Some(c) => return Err(format!("unexpected {c:?} at offset {}", self.pos - 1)),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let path = self.fieldpath()?;
        self.skip_space();
        let rest = &self.text[self.pos..];
        let operator = if rest.starts_with("==") || rest.starts_with("!=") || rest.starts_with("~=")
        {
            let op = &rest[..2];
            self.pos += 2;
            self.skip_space();
            let value = self.value()?;
            match op {
                "==" => Operator::Equal(value),
                "!=" => Operator::NotEqual(value),
                _ => Operator::Matches(
                    Regex::new(&value).map_err(|err| format!("bad regular expression: {err}"))?,
                ),
            }
        } else {
            Operator::Present
        };
        Ok(Selector { path, operator })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, String> {
        let mut path = Vec::new();
        loop {
            self.skip_space();
            let element = match self.peek() {
                Some(q @ ('"' | '`')) => self.quoted(q)?,
                Some(c) if is_field_char(c) => {
                    let start = self.pos;
                    while self.peek().is_some_and(is_field_char) {
                        self.bump();
                    }
                    self.text[start..self.pos].to_string()
                }
                Some(c) => return Err(format!("expected a field name, found {c:?}")),
                None => return Err("expected a field name, found end of filter".into()),
            };
            path.push(element);
            if self.peek() == Some('.') {
                self.bump();
            } else {
                return Ok(path);
            }
        }
    }

    fn value(&mut self) -> Result<String, String> {
        match self.peek() {
            Some(q @ ('"' | '`' | '/')) => self.quoted(q),
            Some(c) if is_value_char(c) => {
                let start = self.pos;
                while self.peek().is_some_and(is_value_char) {
                    self.bump();
                }
                Ok(self.text[start..self.pos].to_string())
            }
            // `parent==` with nothing after it compares against the empty string: containerd's
            // remote-snapshot lookup writes the bottom layer's (empty) parent that way.
            None | Some(',') => Ok(String::new()),
            Some(c) => Err(format!("expected a value after the operator, found {c:?}")),
        }
    }

    /// A quoted string; `"` supports backslash escapes, `` ` `` and `/` are raw.
    fn quoted(&mut self, quote: char) -> Result<String, String> {
        let start = self.pos;
        self.bump();
        let mut out = String::new();
        loop {
            match self.bump() {
                None => return Err(format!("unterminated quoted string at offset {start}")),
                Some(c) if c == quote => return Ok(out),
                Some('\\') if quote != '`' => match self.bump() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(c) if c == quote || c == '\\' => out.push(c),
                    Some(c) if quote == '/' => {
                        // Regex escapes pass through untouched.
                        out.push('\\');
                        out.push(c);
                    }
                    Some(c) => return Err(format!("unknown escape \\{c}")),
                    None => return Err("unterminated escape".into()),
                },
                Some(c) => out.push(c),
            }
        }
    }
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn is_value_char(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Subject(HashMap<&'static str, &'static str>);

    impl Fields for Subject {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(path.join(".").as_str()).map(|v| v.to_string())
        }
    }

    fn subject() -> Subject {
        Subject(HashMap::from([
            ("name", "layer-1"),
            ("kind", "committed"),
            ("parent", "base"),
            ("labels.containerd.io/snapshot.ref", "sha256:abc"),
        ]))
    }

    fn check(filters: &[&str]) -> bool {
        let filters: Vec<String> = filters.iter().map(|s| s.to_string()).collect();
        Filter::parse_all(&filters).unwrap().matches(&subject())
    }

    #[test]
    fn equality_presence_and_negation() {
        assert!(check(&["name==layer-1"]));
        assert!(!check(&["name==layer-2"]));
        assert!(check(&["name!=layer-2"]));
        assert!(check(&["parent"]));
        assert!(!check(&["labels.missing"]));
        assert!(
            check(&["labels.missing!=x"]),
            "a missing field compares as empty"
        );
        assert!(!check(&["labels.missing==x"]));
        assert!(check(&["labels.missing~=^$"]));
    }

    #[test]
    fn quoted_label_keys_and_conjunction() {
        assert!(check(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent==base"#
        ]));
        assert!(!check(&[
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent==other"#
        ]));
        assert!(check(&[r#"kind=="committed""#]));
    }

    #[test]
    fn regex_and_disjunction() {
        assert!(check(&["name~=^layer-[0-9]$"]));
        assert!(check(&["name~=/layer-\\d/"]));
        assert!(check(&["name==nope", "kind==committed"]));
        assert!(!check(&["name==nope", "kind==active"]));
        assert!(check(&[]));
        assert!(check(&[""]));
        assert!(
            !check(&["parent=="]),
            "empty value compares with the empty string"
        );
    }

    #[test]
    fn malformed_filters_are_rejected() {
        for bad in ["==x", "name==a,", "labels.\"open", "name~=(", "name==a b"] {
            let err = Filter::parse_all(&[bad.to_string()]).unwrap_err();
            assert!(
                matches!(err, SnapshotError::InvalidFilter { .. }),
                "{bad}: {err}"
            );
        }
    }
}
