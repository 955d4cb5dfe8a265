//! A strict JSON reader that keeps where every value came from.
//!
//! secsync signs the canonical form of values as JavaScript's `JSON.parse` sees them, while the
//! server must store and relay the exact text it received (PROTOCOL.md 7.6). This reader gives
//! both: every [`Value`] carries its decoded content (numbers as IEEE-754 doubles, strings as
//! JavaScript would hold them, lone surrogates included) and the byte span of its source text.
//!
//! It is stricter than `JSON.parse` in two deliberate ways: duplicate object keys are an error
//! (PROTOCOL.md 7.2 lists them as malformed input) and nesting deeper than [`MAX_DEPTH`] is an
//! error, so hostile input can neither smuggle a second value past the signature nor exhaust the
//! stack.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::ops::Range;

/// Deepest nesting of arrays and objects accepted. secsync frames nest three levels deep.
pub const MAX_DEPTH: usize = 64;

/// Why a text is not acceptable JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("invalid JSON syntax at byte {0}")]
    Syntax(usize),
    #[error("duplicate object key at byte {0}")]
    DuplicateKey(usize),
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("number out of range at byte {0}")]
    NumberOutOfRange(usize),
}

/// A decoded JSON string as JavaScript holds it.
///
/// Almost every string is valid Unicode and borrows from the source when it had no escapes.
/// A string with a lone surrogate (legal in JSON, not in Rust's `str`) is kept as UTF-16.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsStr<'a> {
    Text(Cow<'a, str>),
    Utf16(Vec<u16>),
}

impl JsStr<'_> {
    /// The string as Rust text, or `None` when it holds a lone surrogate.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            JsStr::Text(text) => Some(text),
            JsStr::Utf16(_) => None,
        }
    }

    /// Compares by UTF-16 code units, the order JavaScript's default sort uses.
    pub fn cmp_utf16(&self, other: &Self) -> Ordering {
        self.utf16_units().cmp(other.utf16_units())
    }

    fn utf16_units(&self) -> Box<dyn Iterator<Item = u16> + '_> {
        match self {
            JsStr::Text(text) => Box::new(text.encode_utf16()),
            JsStr::Utf16(units) => Box::new(units.iter().copied()),
        }
    }
}

/// One parsed JSON value and the byte range of its source text.
#[derive(Debug, Clone, PartialEq)]
pub struct Value<'a> {
    pub kind: Kind<'a>,
    pub span: Range<usize>,
}

/// The content of a [`Value`].
#[derive(Debug, Clone, PartialEq)]
pub enum Kind<'a> {
    Null,
    Bool(bool),
    /// Always finite: JSON cannot express NaN, and overflowing literals are rejected.
    Number(f64),
    String(JsStr<'a>),
    Array(Vec<Value<'a>>),
    /// Members in source order; keys are unique.
    Object(Vec<(JsStr<'a>, Value<'a>)>),
}

impl<'a> Value<'a> {
    /// Looks up a member of an object by key; `None` for other kinds or a missing key.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        match &self.kind {
            Kind::Object(members) => members
                .iter()
                .find(|(k, _)| k.as_str() == Some(key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The decoded string, if this is a string without lone surrogates.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::String(s) => s.as_str(),
            _ => None,
        }
    }

    /// The object's members, if this is an object.
    pub fn as_object(&self) -> Option<&[(JsStr<'a>, Value<'a>)]> {
        match &self.kind {
            Kind::Object(members) => Some(members),
            _ => None,
        }
    }
}

/// Parses a complete JSON text (surrounding whitespace allowed).
pub fn parse(text: &str) -> Result<Value<'_>, JsonError> {
    let mut parser = Parser {
        src: text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    parser.skip_ws();
    let value = parser.value(0)?;
    parser.skip_ws();
    if parser.pos != parser.bytes.len() {
        return Err(JsonError::Syntax(parser.pos));
    }
    Ok(value)
}

/// Decodes the text of one JSON string literal (with its quotes), as found at a span.
pub fn decode_string_literal(literal: &str) -> Result<JsStr<'_>, JsonError> {
    let mut parser = Parser {
        src: literal,
        bytes: literal.as_bytes(),
        pos: 0,
    };
    let s = parser.string()?;
    if parser.pos != parser.bytes.len() {
        return Err(JsonError::Syntax(parser.pos));
    }
    Ok(s)
}

struct Parser<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn expect(&mut self, byte: u8) -> Result<(), JsonError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(JsonError::Syntax(self.pos))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, JsonError> {
        let start = self.pos;
        let kind = match self.peek() {
            Some(b'{') => self.object(depth + 1)?,
            Some(b'[') => self.array(depth + 1)?,
            Some(b'"') => Kind::String(self.string()?),
            Some(b't') => self.literal("true", Kind::Bool(true))?,
            Some(b'f') => self.literal("false", Kind::Bool(false))?,
            Some(b'n') => self.literal("null", Kind::Null)?,
            Some(b'-' | b'0'..=b'9') => Kind::Number(self.number()?),
            _ => return Err(JsonError::Syntax(self.pos)),
        };
        Ok(Value {
            kind,
            span: start..self.pos,
        })
    }

    fn literal(&mut self, word: &str, kind: Kind<'a>) -> Result<Kind<'a>, JsonError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(kind)
        } else {
            Err(JsonError::Syntax(self.pos))
        }
    }

    fn object(&mut self, depth: usize) -> Result<Kind<'a>, JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        self.pos += 1; // '{'
        let mut members: Vec<(JsStr<'a>, Value<'a>)> = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Kind::Object(members));
        }
        loop {
            self.skip_ws();
            let key_pos = self.pos;
            if self.peek() != Some(b'"') {
                return Err(JsonError::Syntax(self.pos));
            }
            let key = self.string()?;
            // Objects in secsync frames are small; a linear scan beats hashing here.
            if members.iter().any(|(k, _)| *k == key) {
                return Err(JsonError::DuplicateKey(key_pos));
            }
            self.skip_ws();
            self.expect(b':')?;
            self.skip_ws();
            let value = self.value(depth)?;
            members.push((key, value));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Kind::Object(members));
                }
                _ => return Err(JsonError::Syntax(self.pos)),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Kind<'a>, JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        self.pos += 1; // '['
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Kind::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Kind::Array(items));
                }
                _ => return Err(JsonError::Syntax(self.pos)),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<f64, JsonError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(JsonError::Syntax(self.pos)),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(JsonError::Syntax(self.pos));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(JsonError::Syntax(self.pos));
            }
        }
        // Rust's float parsing rounds correctly, as JavaScript's does.
        let value: f64 = self.src[start..self.pos]
            .parse()
            .map_err(|_| JsonError::Syntax(start))?;
        if value.is_finite() {
            Ok(value)
        } else {
            // JSON.parse gives Infinity, which canonicalize refuses: reject it up front.
            Err(JsonError::NumberOutOfRange(start))
        }
    }

    fn string(&mut self) -> Result<JsStr<'a>, JsonError> {
        self.expect(b'"')?;
        let start = self.pos;
        // Fast path: no escapes, borrow the source.
        loop {
            match self.peek() {
                None | Some(0x00..=0x1f) => return Err(JsonError::Syntax(self.pos)),
                Some(b'"') => {
                    let text = &self.src[start..self.pos];
                    self.pos += 1;
                    return Ok(JsStr::Text(Cow::Borrowed(text)));
                }
                Some(b'\\') => break,
                Some(_) => self.pos += 1,
            }
        }
        let mut units: Vec<u16> = self.src[start..self.pos].encode_utf16().collect();
        loop {
            match self.peek() {
                None | Some(0x00..=0x1f) => return Err(JsonError::Syntax(self.pos)),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(match String::from_utf16(&units) {
                        Ok(text) => JsStr::Text(Cow::Owned(text)),
                        Err(_) => JsStr::Utf16(units),
                    });
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let unit = match self.peek() {
                        Some(b'"') => u16::from(b'"'),
                        Some(b'\\') => u16::from(b'\\'),
                        Some(b'/') => u16::from(b'/'),
                        Some(b'b') => 0x08,
                        Some(b'f') => 0x0c,
                        Some(b'n') => u16::from(b'\n'),
                        Some(b'r') => u16::from(b'\r'),
                        Some(b't') => u16::from(b'\t'),
                        Some(b'u') => {
                            let hex = self
                                .src
                                .get(self.pos + 1..self.pos + 5)
                                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                                .ok_or(JsonError::Syntax(self.pos))?;
                            let unit = u16::from_str_radix(hex, 16)
                                .map_err(|_| JsonError::Syntax(self.pos))?;
                            self.pos += 4;
                            unit
                        }
                        _ => return Err(JsonError::Syntax(self.pos)),
                    };
                    self.pos += 1;
                    units.push(unit);
                }
                Some(_) => {
                    // Copy the unescaped run up to the next quote or backslash.
                    let run_start = self.pos;
                    while let Some(b) = self.peek() {
                        if b == b'"' || b == b'\\' || b < 0x20 {
                            break;
                        }
                        self.pos += 1;
                    }
                    units.extend(self.src[run_start..self.pos].encode_utf16());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_the_source_text() {
        let text = r#" {"a" : [1, 2.50], "b":{"c":"x"}} "#;
        let v = parse(text).unwrap();
        assert_eq!(&text[v.span.clone()], r#"{"a" : [1, 2.50], "b":{"c":"x"}}"#);
        let a = v.get("a").unwrap();
        assert_eq!(&text[a.span.clone()], "[1, 2.50]");
        assert_eq!(&text[v.get("b").unwrap().span.clone()], r#"{"c":"x"}"#);
    }

    #[test]
    fn rejects_duplicates_depth_and_bad_syntax() {
        assert!(matches!(
            parse(r#"{"a":1,"a":2}"#),
            Err(JsonError::DuplicateKey(_))
        ));
        assert!(matches!(
            parse(r#"{"a":1,"\u0061":2}"#),
            Err(JsonError::DuplicateKey(_))
        ));
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(&deep), Err(JsonError::TooDeep));
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(&ok).is_ok());
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\":}",
            "01",
            "1.",
            "-",
            "1e",
            "\"\u{1}\"",
            "\"\\x\"",
            "tru",
            "{} x",
            "\"\\u12\"",
            "NaN",
            "{'a':1}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert_eq!(parse("1e400"), Err(JsonError::NumberOutOfRange(0)));
    }

    #[test]
    fn strings_decode_like_javascript() {
        let v = parse(r#""a\u00e9\ud83d\ude00\n""#).unwrap();
        assert_eq!(v.as_str(), Some("aé😀\n"));
        let lone = parse(r#""\ud800x""#).unwrap();
        assert_eq!(
            lone.kind,
            Kind::String(JsStr::Utf16(vec![0xd800, u16::from(b'x')]))
        );
        assert!(matches!(
            parse(r#""plain""#).unwrap().kind,
            Kind::String(JsStr::Text(Cow::Borrowed("plain")))
        ));
    }
}
