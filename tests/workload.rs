//! The generated workload of the benchmark and the reliability suite is what they say it is: the
//! documented mix of invalid messages and duplicates, judged by the real decoder, and the same
//! stream for the same seed.

mod common;

use common::workload::generate;
use induction_reconciler::messages::decode;
use time::OffsetDateTime;

#[test]
fn the_mix_is_as_documented() {
    let stream = generate(20_000, 3_000, 1_000_000, 7);
    let now = OffsetDateTime::now_utc();
    let invalid = stream.iter().filter(|m| !m.valid).count();
    let duplicates = stream.iter().filter(|m| m.duplicate).count();
    assert!(
        (300..=500).contains(&invalid),
        "about 2% invalid: {invalid}"
    );
    assert!(
        (700..=1300).contains(&duplicates),
        "about 5% duplicates: {duplicates}"
    );
    for m in &stream {
        assert_eq!(
            decode(&m.body, now).is_ok(),
            m.valid,
            "{}",
            String::from_utf8_lossy(&m.body)
        );
    }
    let again = generate(20_000, 3_000, 1_000_000, 7);
    assert!(
        stream.iter().zip(&again).all(|(a, b)| a.body == b.body),
        "deterministic"
    );
}
