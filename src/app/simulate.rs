//! `simulate`: run a log of input messages through decoding and reconciliation in memory and
//! print what the worker would emit and park, with no broker and no database.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};

use serde_json::json;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::{Ledger, Receipt, receipt};
use crate::messages::{OutcomeMessage, Rejection, decode};

/// What a simulation run saw, for its caller's exit status and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Lines read that were not blank.
    pub messages: usize,
    /// Outcomes written.
    pub outcomes: usize,
    /// Messages parked.
    pub parked: usize,
}

/// Reads JSON lines from `input` and writes one JSON line per outcome or parked message to
/// `output`, in input order. `now` fixes the clock; without it the real clock is read per line.
pub fn simulate(
    input: impl BufRead,
    mut output: impl Write,
    now: Option<OffsetDateTime>,
) -> io::Result<Summary> {
    let mut ledger = Ledger::new();
    let mut inbox: HashMap<Uuid, [u8; 32]> = HashMap::new();
    let mut summary = Summary::default();
    for (index, line) in input.split(b'\n').enumerate() {
        let mut body = line?;
        if body.last() == Some(&b'\r') {
            body.pop();
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        summary.messages += 1;
        let clock = now.unwrap_or_else(OffsetDateTime::now_utc);
        let accepted = decode(&body, clock).and_then(|input| {
            let digest: [u8; 32] = Sha256::digest(&body).into();
            match receipt(inbox.get(&input.message_id()), &digest) {
                Receipt::Duplicate => Ok(None),
                Receipt::Reused => Err(Rejection::reused_id()),
                Receipt::New => {
                    inbox.insert(input.message_id(), digest);
                    Ok(Some(input))
                }
            }
        });
        match accepted {
            Ok(None) => {}
            Ok(Some(input)) => {
                let applied = ledger.apply(input.snapshot, input.cause, clock);
                for outcome in &applied.outcomes {
                    let message = OutcomeMessage::new(Uuid::new_v4(), outcome);
                    serde_json::to_writer(&mut output, &message)?;
                    output.write_all(b"\n")?;
                    summary.outcomes += 1;
                }
            }
            Err(rejection) => {
                let line = json!({"parked": {
                    "reason": rejection.reason.as_str(),
                    "detail": rejection.detail,
                    "line": index + 1,
                }});
                serde_json::to_writer(&mut output, &line)?;
                output.write_all(b"\n")?;
                summary.parked += 1;
            }
        }
    }
    output.flush()?;
    Ok(summary)
}
