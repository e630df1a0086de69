//! Ids that travel into NATS subjects (`sb.chat.<chat>`, `sb.user.<user>`),
//! Redis keys and metrics-free logs. A bad id is a typed error, never a
//! wildcard: `.`, `*`, `>` and whitespace are refused along with everything
//! outside a small ASCII set.
use std::{borrow::Borrow, fmt, ops::Deref, sync::Arc};

/// Longest chat or user id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest client message id, in bytes.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 64;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("{kind} id is empty")]
    Empty {
        /// What kind of id it was.
        kind: &'static str,
    },
    /// The id is longer than the limit.
    #[error("{kind} id is {len} bytes, the limit is {max}")]
    TooLong {
        /// What kind of id it was.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The id holds a character outside `A-Z a-z 0-9 _ - : @ = +`.
    #[error("{kind} id contains {ch:?} at byte {pos}; allowed: A-Z a-z 0-9 _ - : @ = +")]
    InvalidChar {
        /// What kind of id it was.
        kind: &'static str,
        /// The first offending character.
        ch: char,
        /// Its byte offset.
        pos: usize,
    },
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'@' | b'=' | b'+')
}

fn validate(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: s.len(),
            max,
        });
    }
    if let Some((pos, ch)) = s
        .char_indices()
        .find(|&(_, c)| !c.is_ascii() || !allowed(c as u8))
    {
        return Err(IdError::InvalidChar { kind, ch, pos });
    }
    Ok(())
}

/// Checks a client message id: 1..=64 bytes of the id alphabet.
pub fn validate_client_msg_id(s: &str) -> Result<(), IdError> {
    validate("client message", s, MAX_CLIENT_MSG_ID_LEN)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and wraps an id.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                validate($kind, s, MAX_ID_LEN)?;
                Ok(Self(Arc::from(s)))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

id_type!(
    /// A validated chat (or channel) id.
    ChatId,
    "chat"
);
id_type!(
    /// A validated user id (the token's `sub`).
    UserId,
    "user"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_alphabet() {
        for ok in [
            "general",
            "dm:alice:bob",
            "user@example",
            "A-Z_09+=",
            &"x".repeat(64),
        ] {
            assert!(ChatId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_subject_breakers() {
        for bad in ["a.b", "*", ">", "a b", "a\tb", "a\nb", "é", "a/b", ""] {
            assert!(ChatId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            UserId::parse(&"x".repeat(65)),
            Err(IdError::TooLong {
                kind: "user",
                len: 65,
                max: 64
            })
        );
        assert_eq!(
            ChatId::parse("a.b"),
            Err(IdError::InvalidChar {
                kind: "chat",
                ch: '.',
                pos: 1
            })
        );
    }

    proptest::proptest! {
        #[test]
        fn valid_ids_never_contain_subject_tokens(s in "\\PC{0,80}") {
            if let Ok(id) = ChatId::parse(&s) {
                proptest::prop_assert!(!id.contains(['.', '*', '>', ' ']));
                proptest::prop_assert!(id.len() <= MAX_ID_LEN);
            }
        }
    }
}
