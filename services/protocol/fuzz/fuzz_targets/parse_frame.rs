//! Fuzzes the frame parser and everything a gateway runs on an untrusted frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secsync_protocol::{parse_client_frame, parse_connect, DocumentId, ParseOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let doc = DocumentId::parse("doc").expect("valid id");
    for allow in [false, true] {
        let options = ParseOptions { allow_extra_public_data_fields: allow };
        match parse_client_frame(text, options) {
            Ok(frame) => {
                // The body must itself parse to the same body: what we relay is what we accepted.
                let again = parse_client_frame(frame.signed().body(), options).expect("body parses");
                assert_eq!(again.signed().body(), frame.signed().body());
                let _ = frame.check_document(&doc);
                let _ = frame.verify();
            }
            Err(error) => {
                let _ = error.reply();
            }
        }
    }
    let (path, query) = text.split_once('?').unwrap_or((text, ""));
    let _ = parse_connect(path, Some(query));
});
