//! The inbox rule of CONTRACT.md: a `message_id` stands for one body. The same id with the same
//! body is a duplicate message (acknowledged, nothing applied); with another body it is a reused
//! id (parked `message_id_reused`). Bodies are compared by their SHA-256, computed at the edge.

/// What the inbox says about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// The id was not accepted before: apply the message.
    New,
    /// The id was accepted with this very body: the same message again.
    Duplicate,
    /// The id was accepted with another body.
    Reused,
}

/// Judges a message whose body has `digest`, given the digest accepted for its id, if any.
pub fn receipt(accepted: Option<&[u8; 32]>, digest: &[u8; 32]) -> Receipt {
    match accepted {
        None => Receipt::New,
        Some(accepted) if accepted == digest => Receipt::Duplicate,
        Some(_) => Receipt::Reused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_stands_for_one_body() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(receipt(None, &a), Receipt::New);
        assert_eq!(receipt(Some(&a), &a), Receipt::Duplicate);
        assert_eq!(receipt(Some(&a), &b), Receipt::Reused);
    }
}
