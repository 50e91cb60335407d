//! A cheap look at a body's identifying fields without decoding it: which lane a delivery goes
//! to, which routing key `publish` uses, which message id `parked list` shows. Nothing here
//! decides whether a message is valid; that is `decode`'s job.

use serde::Deserialize;
use serde::de::IgnoredAny;

/// The identifying fields of a body, each `None` when absent, not text, or the body is not a
/// JSON object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peek {
    /// `message_id`.
    pub message_id: Option<String>,
    /// `message_type`.
    pub message_type: Option<String>,
    /// `payload.trn`.
    pub trn: Option<String>,
}

/// Reads the identifying fields of `body`. Other fields are skipped, not parsed into values.
pub fn peek(body: &[u8]) -> Peek {
    serde_json::from_slice::<Envelope>(body)
        .map(|envelope| Peek {
            message_id: envelope.message_id.and_then(Text::into_string),
            message_type: envelope.message_type.and_then(Text::into_string),
            trn: envelope
                .payload
                .and_then(|payload| payload.trn)
                .and_then(Text::into_string),
        })
        .unwrap_or_default()
}

/// The envelope's identifying fields. Read by hand rather than derived so that a key given twice
/// behaves as in `decode` (the last one counts) instead of failing the whole peek.
#[derive(Default)]
struct Envelope {
    message_id: Option<Text>,
    message_type: Option<Text>,
    payload: Option<Payload>,
}

#[derive(Default)]
struct Payload {
    trn: Option<Text>,
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Envelope;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Envelope, A::Error> {
                let mut envelope = Envelope::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "message_id" => envelope.message_id = Some(map.next_value()?),
                        "message_type" => envelope.message_type = Some(map.next_value()?),
                        "payload" => envelope.payload = map.next_value::<Option<Payload>>()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(envelope)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Payload;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Payload, A::Error> {
                let mut payload = Payload::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "trn" {
                        payload.trn = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(payload)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Text {
    Text(String),
    Other(IgnoredAny),
}

impl Text {
    fn into_string(self) -> Option<String> {
        match self {
            Self::Text(text) => Some(text),
            Self::Other(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_identifying_fields() {
        let body = br#"{"message_id":"a","message_type":"ab_claim","payload":{"trn":"1234567","x":[1,{"y":2}]},"z":null}"#;
        assert_eq!(
            peek(body),
            Peek {
                message_id: Some("a".into()),
                message_type: Some("ab_claim".into()),
                trn: Some("1234567".into()),
            }
        );
    }

    #[test]
    fn a_field_that_is_not_text_is_absent_and_the_others_are_still_read() {
        let body =
            br#"{"message_id":7,"message_type":"school_registration","payload":{"trn":[1]}}"#;
        assert_eq!(
            peek(body),
            Peek {
                message_id: None,
                message_type: Some("school_registration".into()),
                trn: None,
            }
        );
    }

    #[test]
    fn a_key_given_twice_counts_as_in_decode_the_last_one() {
        let body = br#"{"message_type":"school_registration","payload":{"trn":"1"},"message_type":"ab_claim","payload":{"trn":"2"}}"#;
        let peeked = peek(body);
        assert_eq!(peeked.message_type.as_deref(), Some("ab_claim"));
        assert_eq!(peeked.trn.as_deref(), Some("2"));
        let value: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            value["message_type"], "ab_claim",
            "the same reading as decode's parser"
        );
    }

    #[test]
    fn a_body_that_is_not_a_json_object_has_nothing_to_peek_at() {
        for body in [
            &b"[1,2]"[..],
            b"not json",
            b"",
            b"\xff\xfe",
            b"{\"payload\": 3}",
        ] {
            assert_eq!(peek(body).trn, None);
        }
    }
}
