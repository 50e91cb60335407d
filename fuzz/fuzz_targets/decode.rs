//! Fuzzes `messages::decode` with arbitrary bytes. Beyond "never panics", it checks what the
//! contract promises of every rejection: the reason codes' precedence for size and encoding, a
//! short human detail, and that the detail never echoes a seven-digit number (a TRN) from the
//! body. An accepted body decodes the same way twice.
#![no_main]

use induction_reconciler::messages::{ReasonCode, decode};
use libfuzzer_sys::fuzz_target;
use time::macros::datetime;

const MAX_BODY_BYTES: usize = 65_536;

fuzz_target!(|body: &[u8]| {
    let now = datetime!(2026-01-15 12:00 UTC);
    match decode(body, now) {
        Ok(input) => {
            assert!(body.len() <= MAX_BODY_BYTES);
            assert!(std::str::from_utf8(body).is_ok());
            assert_eq!(decode(body, now).ok(), Some(input), "decoding is deterministic");
        }
        Err(rejection) => {
            if body.len() > MAX_BODY_BYTES {
                assert_eq!(rejection.reason, ReasonCode::TooLarge);
            } else if std::str::from_utf8(body).is_err() {
                assert_eq!(rejection.reason, ReasonCode::InvalidUtf8);
            } else {
                assert!(!matches!(
                    rejection.reason,
                    ReasonCode::TooLarge | ReasonCode::InvalidUtf8
                ));
            }
            assert!(!rejection.detail.is_empty());
            assert!(rejection.detail.len() < 400, "a short detail");
            for trn in seven_digit_runs(body) {
                assert!(
                    !rejection.detail.contains(trn),
                    "the detail echoes a number from the body: {}",
                    rejection.detail
                );
            }
        }
    }
});

/// Every run of exactly seven ASCII digits in the body.
fn seven_digit_runs(body: &[u8]) -> impl Iterator<Item = &str> {
    body.split(|b| !b.is_ascii_digit())
        .filter(|run| run.len() == 7)
        .filter_map(|run| std::str::from_utf8(run).ok())
}
