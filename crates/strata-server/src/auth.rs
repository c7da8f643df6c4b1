//! Bearer tokens: read once from `tokens_file`, kept only as SHA-256
//! hashes, compared in constant time against every token (no early exit,
//! so the time taken says nothing about which token or how much of it
//! matched).

use std::path::Path;

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// The accepted tokens.
pub struct Tokens {
    hashes: Vec<[u8; 32]>,
}

impl Tokens {
    /// The tokens in `path`, one per line (blank lines and `#` comments
    /// skipped). A missing file gives no tokens (everything refused),
    /// with a warning; another read error is an error.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(
                    "tokens file {} is missing: every request is refused",
                    path.display()
                );
                String::new()
            }
            Err(e) => return Err(format!("reading tokens file {}: {e}", path.display())),
        };
        let t = Tokens::parse(&text);
        if t.hashes.is_empty() {
            tracing::warn!(
                "tokens file {} has no tokens: every request is refused",
                path.display()
            );
        }
        if let Ok(m) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt as _;
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "tokens file {} is readable by others than its owner",
                    path.display()
                );
            }
        }
        Ok(t)
    }

    /// Tokens from the text of a tokens file.
    pub fn parse(text: &str) -> Tokens {
        let hashes = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| Sha256::digest(l.as_bytes()).into())
            .collect();
        Tokens { hashes }
    }

    /// Whether an `Authorization` header value carries an accepted token.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = authorization.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let h: [u8; 32] = Sha256::digest(token).into();
        let mut ok = subtle::Choice::from(0u8);
        for known in &self.hashes {
            ok |= known.ct_eq(&h);
        }
        bool::from(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listed_bearer_token_is_accepted() {
        let t = Tokens::parse("# ops\nsecret-one\n\n  secret-two  \n");
        assert!(t.accepts(Some(b"Bearer secret-one")));
        assert!(t.accepts(Some(b"Bearer secret-two")));
        assert!(!t.accepts(Some(b"Bearer secret-on")));
        assert!(!t.accepts(Some(b"Bearer secret-onf")));
        assert!(!t.accepts(Some(b"Basic secret-one")));
        assert!(!t.accepts(Some(b"secret-one")));
        assert!(!t.accepts(Some(b"Bearer # ops")));
        assert!(!t.accepts(None));
        let none = Tokens::parse("\n# nothing\n");
        assert!(!none.accepts(Some(b"Bearer ")));
        assert!(!none.accepts(Some(b"Bearer x")));
    }
}
