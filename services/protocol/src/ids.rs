//! Newtypes for the values a frame carries, parsed once at the boundary.
//!
//! A value of one of these types is valid by construction: a [`PublicKey`] decodes to 32 bytes,
//! a [`Clock`] is a non-negative safe integer, a [`DocumentId`] is non-empty and bounded. Code past
//! the parser never re-checks them.

use std::fmt;

use crate::b64;

/// Longest document or snapshot id accepted, in bytes (PROTOCOL.md 7.1).
pub const MAX_ID_LEN: usize = 256;

/// Largest integer a JavaScript number holds exactly (2^53 − 1).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why a value could not become one of these types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("not libsodium base64")]
    Base64,
    #[error("wrong decoded length")]
    Length,
    #[error("clock is not a non-negative safe integer")]
    Clock,
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Box<str>);

        impl $name {
            pub fn parse(text: &str) -> Result<Self, IdError> {
                if text.is_empty() {
                    Err(IdError::Empty)
                } else if text.len() > MAX_ID_LEN {
                    Err(IdError::TooLong)
                } else {
                    Ok(Self(text.into()))
                }
            }

            pub fn as_str(&self) -> &str {
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

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(text: &str) -> Result<Self, IdError> {
                Self::parse(text)
            }
        }
    };
}

string_id!(
    /// A document id: chosen by the application, any non-empty UTF-8 string of at most 256 bytes.
    DocumentId
);
string_id!(
    /// A snapshot id: chosen by the client (usually 24 random bytes in base64), non-empty, bounded.
    SnapshotId
);

/// An author's Ed25519 public key: its base64 text as sent, and the 32 bytes it decodes to.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey {
    text: Box<str>,
    bytes: [u8; 32],
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let bytes = b64::decode_array::<32>(text).map_err(|_| {
            if b64::validate(text).is_ok() {
                IdError::Length
            } else {
                IdError::Base64
            }
        })?;
        Ok(Self {
            text: text.into(),
            bytes,
        })
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self {
            text: b64::encode(bytes).into(),
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.text)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A detached Ed25519 signature (64 bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct SignatureBytes([u8; 64]);

impl SignatureBytes {
    pub fn parse(text: &str) -> Result<Self, IdError> {
        b64::decode_array::<64>(text).map(Self).map_err(|_| {
            if b64::validate(text).is_ok() {
                IdError::Length
            } else {
                IdError::Base64
            }
        })
    }

    pub fn from_bytes(bytes: [u8; 64]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Signatures are not secret, but nothing gains from printing them.
        f.write_str("SignatureBytes(..)")
    }
}

/// An update clock: a non-negative integer a JavaScript number holds exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Clock(u64);

impl Clock {
    pub const ZERO: Clock = Clock(0);

    pub fn new(value: u64) -> Result<Self, IdError> {
        if value <= MAX_SAFE_INTEGER {
            Ok(Self(value))
        } else {
            Err(IdError::Clock)
        }
    }

    /// Accepts a JSON number the way JavaScript reads it: `2`, `2.0` and `0.2e1` are all 2.
    pub fn from_f64(value: f64) -> Result<Self, IdError> {
        if value.fract() == 0.0 && (0.0..=MAX_SAFE_INTEGER as f64).contains(&value) {
            Ok(Self(value as u64))
        } else {
            Err(IdError::Clock)
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// The clock that follows this one, if it is still a safe integer.
    pub fn next(self) -> Option<Clock> {
        Clock::new(self.0 + 1).ok()
    }
}

impl fmt::Display for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn clocks_accept_integral_numbers_only() {
        assert_eq!(Clock::from_f64(2.0).unwrap().get(), 2);
        assert_eq!(Clock::from_f64(-0.0).unwrap().get(), 0);
        for bad in [-1.0, 1.5, 1e21, MAX_SAFE_INTEGER as f64 + 1.0, f64::NAN] {
            assert_eq!(Clock::from_f64(bad), Err(IdError::Clock), "{bad}");
        }
    }

    #[test]
    fn ids_are_bounded() {
        assert_eq!(DocumentId::parse(""), Err(IdError::Empty));
        assert!(DocumentId::parse(&"x".repeat(MAX_ID_LEN)).is_ok());
        assert_eq!(
            SnapshotId::parse(&"x".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn public_keys_round_trip(bytes in any::<[u8; 32]>()) {
            let key = PublicKey::from_bytes(bytes);
            let parsed = PublicKey::parse(key.as_str()).unwrap();
            prop_assert_eq!(parsed.as_bytes(), &bytes);
            prop_assert_eq!(parsed, key);
        }

        #[test]
        fn signatures_round_trip(bytes in proptest::collection::vec(any::<u8>(), 64)) {
            let arr: [u8; 64] = bytes.clone().try_into().unwrap();
            let parsed = SignatureBytes::parse(&b64::encode(&bytes)).unwrap();
            prop_assert_eq!(parsed.as_bytes(), &arr);
        }

        #[test]
        fn wrong_lengths_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let text = b64::encode(&bytes);
            prop_assert_eq!(PublicKey::parse(&text).is_ok(), bytes.len() == 32);
            prop_assert_eq!(SignatureBytes::parse(&text).is_ok(), bytes.len() == 64);
        }

        #[test]
        fn clocks_round_trip(value in 0..=MAX_SAFE_INTEGER) {
            let clock = Clock::new(value).unwrap();
            prop_assert_eq!(Clock::from_f64(value as f64), Ok(clock));
            prop_assert_eq!(clock.to_string().parse::<u64>().unwrap(), value);
        }

        #[test]
        fn string_ids_round_trip(text in "\\PC{1,64}") {
            let id = DocumentId::parse(&text).unwrap();
            prop_assert_eq!(id.as_str(), text.as_str());
            prop_assert_eq!(SnapshotId::parse(&text).unwrap().to_string(), text);
        }
    }
}
