//! libsodium's default base64 variant: URL-safe alphabet, no padding, strict (PROTOCOL.md 2.1).
//!
//! The decoder refuses `=`, `+`, `/`, whitespace, lengths of the form 4n+1 and non-zero unused
//! bits in the last character, as `sodium.from_base64` does. [`validate`] checks the same rules
//! without allocating, for payloads the server never needs decoded (nonces, ciphertexts).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// Why a text is not libsodium base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not libsodium base64 (URL-safe, unpadded, canonical)")]
pub struct Base64Error;

/// Encodes bytes as libsodium base64.
pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes libsodium base64 strictly.
pub fn decode(text: &str) -> Result<Vec<u8>, Base64Error> {
    URL_SAFE_NO_PAD.decode(text).map_err(|_| Base64Error)
}

/// Decodes into a fixed-size array; any other decoded length is an error.
pub fn decode_array<const N: usize>(text: &str) -> Result<[u8; N], Base64Error> {
    // Checking the length first keeps an oversized input from being decoded at all.
    if text.len() != encoded_len(N) {
        return Err(Base64Error);
    }
    decode(text)?.try_into().map_err(|_| Base64Error)
}

/// The length of the unpadded encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// Checks that `text` is strict libsodium base64 and returns its decoded length.
pub fn validate(text: &str) -> Result<usize, Base64Error> {
    let bytes = text.as_bytes();
    let tail = bytes.len() % 4;
    if tail == 1 {
        return Err(Base64Error);
    }
    let mut last = 0u8;
    for &b in bytes {
        last = sextet(b).ok_or(Base64Error)?;
    }
    // The last character of a 2- or 3-character group carries unused low bits that must be 0.
    let unused_mask = match tail {
        2 => 0b1111,
        3 => 0b11,
        _ => 0,
    };
    if last & unused_mask != 0 {
        return Err(Base64Error);
    }
    Ok(bytes.len() / 4 * 3 + tail.saturating_sub(1))
}

fn sextet(b: u8) -> Option<u8> {
    match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'-' => Some(62),
        b'_' => Some(63),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strictness_matches_libsodium() {
        assert_eq!(decode("-__-AQ").unwrap(), vec![0xfb, 0xff, 0xfe, 0x01]);
        for bad in [
            "-__-AQ==", "+//+AQ", "-__-AR", "-__-A", " -__-AQ", "-__-AQ\n",
        ] {
            assert_eq!(decode(bad), Err(Base64Error), "{bad:?}");
            assert_eq!(validate(bad), Err(Base64Error), "{bad:?}");
        }
        assert_eq!(decode("").unwrap(), Vec::<u8>::new());
        assert_eq!(validate(""), Ok(0));
    }

    proptest! {
        #[test]
        fn round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let text = encode(&bytes);
            prop_assert_eq!(validate(&text), Ok(bytes.len()));
            prop_assert_eq!(decode(&text), Ok(bytes));
        }

        #[test]
        fn validate_agrees_with_decode(text in "[A-Za-z0-9_+/=\\- ]{0,40}") {
            prop_assert_eq!(validate(&text).is_ok(), decode(&text).is_ok());
            if let Ok(bytes) = decode(&text) {
                prop_assert_eq!(validate(&text), Ok(bytes.len()));
            }
        }
    }
}
