//! containerd's filter syntax, as `List` receives it: a list of filters
//! (any may match), each selectors joined by `,` (all must match). A
//! selector is `fieldpath`, `fieldpath==value`, `fieldpath!=value` or
//! `fieldpath~=regexp`; path segments are joined by `.` and may be quoted
//! (`"..."` with Go escapes, `/.../`, `|...|`); a value is quoted or runs
//! to the next `,`. Fields: `name`, `parent`, `kind`, `labels.KEY`.
//!
//! Regular expressions (`~=`) match everything: containerd re-checks
//! what a snapshotter lists, so listing more is safe.

use crate::core::Info;

/// How a selector compares.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
    Any,
}

/// One selector.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// One filter: selectors that must all match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<Selector>);

/// A filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("filter {input:?}: {reason} at byte {at}")]
pub struct FilterError {
    input: String,
    reason: &'static str,
    at: usize,
}

struct P<'a> {
    s: &'a [u8],
    i: usize,
    input: &'a str,
}

impl P<'_> {
    fn err(&self, reason: &'static str) -> FilterError {
        FilterError {
            input: self.input.to_string(),
            reason,
            at: self.i,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c == b' ' || c == b'\t') {
            self.i += 1;
        }
    }

    /// A quoted string starting at the current quote character.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let q = self.peek().ok_or_else(|| self.err("expected a quote"))?;
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let c = self.peek().ok_or_else(|| self.err("unterminated quote"))?;
            self.i += 1;
            if c == q {
                break;
            }
            if c == b'\\' && q == b'"' {
                let e = self.peek().ok_or_else(|| self.err("unterminated escape"))?;
                self.i += 1;
                out.push(match e {
                    b'n' => b'\n',
                    b't' => b'\t',
                    b'r' => b'\r',
                    other => other,
                });
            } else if c == b'\\' && self.peek() == Some(q) {
                // an escaped delimiter in /.../ or |...|
                out.push(q);
                self.i += 1;
            } else {
                out.push(c);
            }
        }
        String::from_utf8(out).map_err(|_| self.err("not UTF-8"))
    }

    fn segment(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some(b'"' | b'/' | b'|') => self.quoted(),
            _ => {
                let start = self.i;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
                {
                    self.i += 1;
                }
                if start == self.i {
                    return Err(self.err("expected a field name"));
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
            }
        }
    }

    fn value(&mut self) -> Result<String, FilterError> {
        self.skip_ws();
        match self.peek() {
            Some(b'"' | b'/' | b'|') => self.quoted(),
            _ => {
                let start = self.i;
                while self.peek().is_some_and(|c| c != b',') {
                    self.i += 1;
                }
                Ok(String::from_utf8_lossy(&self.s[start..self.i])
                    .trim()
                    .to_string())
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        self.skip_ws();
        let mut path = vec![self.segment()?];
        while self.peek() == Some(b'.') {
            self.i += 1;
            path.push(self.segment()?);
        }
        self.skip_ws();
        let rest = &self.s[self.i..];
        let op = if rest.starts_with(b"==") {
            self.i += 2;
            Op::Eq(self.value()?)
        } else if rest.starts_with(b"!=") {
            self.i += 2;
            Op::Ne(self.value()?)
        } else if rest.starts_with(b"~=") {
            self.i += 2;
            self.value()?;
            Op::Any
        } else {
            Op::Present
        };
        self.skip_ws();
        Ok(Selector { path, op })
    }
}

impl Filter {
    /// Parse one filter string.
    pub fn parse(input: &str) -> Result<Filter, FilterError> {
        let mut p = P {
            s: input.as_bytes(),
            i: 0,
            input,
        };
        let mut sels = Vec::new();
        if input.trim().is_empty() {
            return Ok(Filter(sels));
        }
        loop {
            sels.push(p.selector()?);
            match p.peek() {
                None => break,
                Some(b',') => p.i += 1,
                Some(_) => return Err(p.err("expected `,` or the end")),
            }
        }
        Ok(Filter(sels))
    }

    /// Whether `info` satisfies every selector.
    pub fn matches(&self, info: &Info) -> bool {
        self.0.iter().all(|s| {
            let field: Option<String> = match s.path.first().map(String::as_str) {
                Some("name") if s.path.len() == 1 => Some(info.name.clone()),
                // no parent is the empty string, as containerd has it
                Some("parent") if s.path.len() == 1 => {
                    Some(info.parent.clone().unwrap_or_default())
                }
                Some("kind") if s.path.len() == 1 => Some(info.kind.as_str().to_string()),
                Some("labels") if s.path.len() >= 2 => {
                    info.labels.get(&s.path[1..].join(".")).cloned()
                }
                _ => None,
            };
            match &s.op {
                Op::Any => true,
                Op::Present => field.is_some_and(|v| !v.is_empty()),
                Op::Eq(v) => field.as_deref() == Some(v.as_str()),
                Op::Ne(v) => field.as_deref() != Some(v.as_str()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::core::{Kind, Usage};

    fn info(name: &str, parent: Option<&str>, labels: &[(&str, &str)]) -> Info {
        Info {
            id: 1,
            name: name.into(),
            parent: parent.map(Into::into),
            kind: Kind::Committed,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: 0,
            updated: 0,
            usage: Usage::default(),
            remote: None,
            tops: Vec::new(),
        }
    }

    #[test]
    fn the_filter_containerd_sends_after_already_exists() {
        // metadata/snapshot.go: the target unquoted, the parent Go-quoted
        let f = Filter::parse(
            r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/sha256:p q""#,
        )
        .unwrap();
        let ref_ = [("containerd.io/snapshot.ref", "sha256:abc")];
        assert!(f.matches(&info("x", Some("default/3/sha256:p q"), &ref_)));
        assert!(!f.matches(&info("x", Some("default/3/sha256:other"), &ref_)));
        assert!(!f.matches(&info("x", None, &ref_)));
        // a bottom layer: parent=="" matches no parent
        let bottom =
            Filter::parse(r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#).unwrap();
        assert!(bottom.matches(&info("x", None, &ref_)));
        assert!(!bottom.matches(&info("x", Some("p"), &ref_)));
        let other = [("containerd.io/snapshot.ref", "sha256:abd")];
        assert!(!f.matches(&info("x", Some("default/3/sha256:p q"), &other)));
    }

    #[test]
    fn selectors_operators_and_errors() {
        let i = info("n", None, &[("a.b", "1")]);
        assert!(Filter::parse("labels.\"a.b\"").unwrap().matches(&i));
        assert!(Filter::parse("labels.a.b==1").unwrap().matches(&i));
        assert!(
            Filter::parse("kind==committed,name!=m")
                .unwrap()
                .matches(&i)
        );
        assert!(!Filter::parse("kind==active").unwrap().matches(&i));
        assert!(Filter::parse("name~=^n$").unwrap().matches(&i));
        assert!(!Filter::parse("parent").unwrap().matches(&i));
        assert!(Filter::parse("").unwrap().matches(&i));
        for bad in ["labels.\"open", "==x", "name==a b,", "name junk"] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }
}
