//! Canonical JSON exactly as the npm package `canonicalize` 2.x writes it (PROTOCOL.md 2.2).
//!
//! Keys are sorted by UTF-16 code units, strings are escaped as `JSON.stringify` escapes them and
//! numbers are written as ECMAScript's `Number#toString`. Everything secsync signs or hashes goes
//! through here, so `vectors/canonicalize.json` checks it byte for byte.

use crate::json::{JsStr, Kind, Value};

/// The canonical text of a parsed value.
pub fn to_canonical(value: &Value<'_>) -> String {
    let mut out = String::with_capacity(value.span.len());
    write_value(value, &mut out);
    out
}

fn write_value(value: &Value<'_>, out: &mut String) {
    match &value.kind {
        Kind::Null => out.push_str("null"),
        Kind::Bool(true) => out.push_str("true"),
        Kind::Bool(false) => out.push_str("false"),
        Kind::Number(n) => write_number(*n, out),
        Kind::String(s) => write_js_str(s, out),
        Kind::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Kind::Object(members) => {
            let mut sorted: Vec<_> = members.iter().collect();
            sorted.sort_by(|(a, _), (b, _)| a.cmp_utf16(b));
            out.push('{');
            for (i, (key, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_js_str(key, out);
                out.push(':');
                write_value(item, out);
            }
            out.push('}');
        }
    }
}

/// Writes a JavaScript string as `JSON.stringify` does.
pub fn write_js_str(s: &JsStr<'_>, out: &mut String) {
    match s {
        JsStr::Text(text) => write_str(text, out),
        JsStr::Utf16(units) => {
            out.push('"');
            for decoded in char::decode_utf16(units.iter().copied()) {
                match decoded {
                    Ok(c) => push_escaped_char(c, out),
                    Err(lone) => push_unicode_escape(lone.unpaired_surrogate(), out),
                }
            }
            out.push('"');
        }
    }
}

/// Writes Rust text as a JSON string literal, escaped as `JSON.stringify` does.
pub fn write_str(text: &str, out: &mut String) {
    out.reserve(text.len() + 2);
    out.push('"');
    // Copy runs that need no escaping in one go; base64 payloads are one long run.
    let mut run_start = 0;
    for (i, b) in text.bytes().enumerate() {
        if b < 0x20 || b == b'"' || b == b'\\' {
            out.push_str(&text[run_start..i]);
            push_escaped_char(char::from(b), out);
            run_start = i + 1;
        }
    }
    out.push_str(&text[run_start..]);
    out.push('"');
}

fn push_escaped_char(c: char, out: &mut String) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\u{08}' => out.push_str("\\b"),
        '\u{0c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if u32::from(c) < 0x20 => push_unicode_escape(u32::from(c) as u16, out),
        c => out.push(c),
    }
}

fn push_unicode_escape(unit: u16, out: &mut String) {
    use std::fmt::Write as _;
    let _ = write!(out, "\\u{unit:04x}");
}

/// Writes a finite number as ECMAScript's `Number.prototype.toString()` (radix 10).
pub fn write_number(n: f64, out: &mut String) {
    if n == 0.0 {
        // Covers -0 as well.
        out.push('0');
        return;
    }
    if n < 0.0 {
        out.push('-');
    }
    // Rust's `{:e}` yields the shortest digits that round-trip, which is what ECMAScript uses.
    let exp_form = format!("{:e}", n.abs());
    let (mantissa, exponent) = exp_form.split_once('e').unwrap_or((&exp_form, "0"));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let k = i32::try_from(digits.len()).unwrap_or(i32::MAX);
    // ECMAScript's n: the value is digits × 10^(n − k).
    let n_exp = exponent.parse::<i32>().unwrap_or(0) + 1;
    if k <= n_exp && n_exp <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n_exp - k) as usize));
    } else if 0 < n_exp && n_exp <= 21 {
        out.push_str(&digits[..n_exp as usize]);
        out.push('.');
        out.push_str(&digits[n_exp as usize..]);
    } else if -6 < n_exp && n_exp <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n_exp) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if n_exp > 0 { '+' } else { '-' });
        out.push_str(&(n_exp - 1).abs().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(n: f64) -> String {
        let mut s = String::new();
        write_number(n, &mut s);
        s
    }

    #[test]
    fn numbers_follow_ecmascript() {
        assert_eq!(num(0.0), "0");
        assert_eq!(num(-0.0), "0");
        assert_eq!(num(7.0), "7");
        assert_eq!(num(-3.0), "-3");
        assert_eq!(num(0.1), "0.1");
        assert_eq!(num(1e21), "1e+21");
        assert_eq!(num(1e20), "100000000000000000000");
        assert_eq!(num(1.5e-7), "1.5e-7");
        assert_eq!(num(0.000_001), "0.000001");
        assert_eq!(num(123.456), "123.456");
        assert_eq!(num(5e-324), "5e-324");
        assert_eq!(num(f64::MAX), "1.7976931348623157e+308");
        assert_eq!(num(9_007_199_254_740_993.0), "9007199254740992");
    }

    #[test]
    fn strings_escape_like_json_stringify() {
        let mut s = String::new();
        write_str("a\"b\\c\u{1}\u{7f}/é\u{2028}", &mut s);
        assert_eq!(s, "\"a\\\"b\\\\c\\u0001\u{7f}/é\u{2028}\"");
    }
}
