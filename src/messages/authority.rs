//! "Who may say what" (CONTRACT.md section 2): a message is accepted only when its AMQP
//! `user_id` is present and allowed to publish its `message_type`, and it arrived under that
//! type's routing key. A replay by an operator is judged by the publisher it names in
//! `x-original-user-id`; that header is believed on an operator's messages only.

use super::rejection::{ReasonCode, Rejection};
use crate::domain::MessageKind;

/// Who published a delivery and how it was routed, from its AMQP properties.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Provenance<'a> {
    /// The AMQP `user_id` property (RabbitMQ refuses one that is not the connection's user).
    pub user_id: Option<&'a str>,
    /// The routing key it was delivered with.
    pub routing_key: &'a str,
    /// The `x-original-user-id` header, if any.
    pub original_user_id: Option<&'a str>,
}

/// Which users may publish each message type, which users are operators, and each type's
/// routing key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publishers {
    /// Users allowed to publish `school_registration`.
    pub school_registration: Vec<String>,
    /// Users allowed to publish `ab_claim`.
    pub ab_claim: Vec<String>,
    /// Operators, whose replays carry the original publisher in `x-original-user-id`.
    pub operators: Vec<String>,
    /// The routing key of `school_registration`.
    pub registration_routing_key: String,
    /// The routing key of `ab_claim`.
    pub claim_routing_key: String,
}

impl Publishers {
    /// The publisher a delivery is judged by: the original one named by an operator's replay,
    /// otherwise its `user_id`. `None` without a `user_id`.
    pub fn publisher<'a>(&self, provenance: &Provenance<'a>) -> Option<&'a str> {
        let user = provenance.user_id?;
        match provenance.original_user_id {
            Some(original) if self.is_operator(user) => Some(original),
            _ => Some(user),
        }
    }

    /// True when `user` is a configured operator.
    pub fn is_operator(&self, user: &str) -> bool {
        self.operators.iter().any(|o| o == user)
    }

    /// Accepts a message of `kind` with this provenance, returning its publisher, or refuses it
    /// with `unauthorised_publisher` and a detail naming the rule and the user (never body
    /// data).
    pub fn authorise(
        &self,
        kind: MessageKind,
        provenance: &Provenance<'_>,
    ) -> Result<String, Rejection> {
        let refuse = |detail: String| Rejection::new(ReasonCode::UnauthorisedPublisher, detail);
        let (allowed, routing_key) = match kind {
            MessageKind::SchoolRegistration => {
                (&self.school_registration, &self.registration_routing_key)
            }
            MessageKind::AbClaim => (&self.ab_claim, &self.claim_routing_key),
        };
        let Some(publisher) = self.publisher(provenance) else {
            return Err(refuse(
                "the message has no AMQP user_id; producers must set it to their RabbitMQ user"
                    .into(),
            ));
        };
        if provenance.routing_key != routing_key {
            return Err(refuse(format!(
                "a {} message must arrive with routing key {routing_key:?}, not {:?}",
                kind.as_str(),
                provenance.routing_key
            )));
        }
        if !allowed.iter().any(|user| user == publisher) {
            return Err(refuse(format!(
                "user {publisher:?} may not publish {} messages",
                kind.as_str()
            )));
        }
        Ok(publisher.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publishers() -> Publishers {
        Publishers {
            school_registration: vec!["school-service".into()],
            ab_claim: vec!["ab-service".into()],
            operators: vec!["induction-operator".into()],
            registration_routing_key: "school.registration".into(),
            claim_routing_key: "ab.claim".into(),
        }
    }

    fn from<'a>(user: Option<&'a str>, key: &'a str, original: Option<&'a str>) -> Provenance<'a> {
        Provenance {
            user_id: user,
            routing_key: key,
            original_user_id: original,
        }
    }

    #[test]
    fn each_producer_may_publish_its_own_type_under_its_own_key() {
        let p = publishers();
        let claim = from(Some("ab-service"), "ab.claim", None);
        assert_eq!(
            p.authorise(MessageKind::AbClaim, &claim).unwrap(),
            "ab-service"
        );
        let registration = from(Some("school-service"), "school.registration", None);
        assert!(
            p.authorise(MessageKind::SchoolRegistration, &registration)
                .is_ok()
        );
    }

    #[test]
    fn a_claim_from_the_school_side_without_a_user_or_under_the_wrong_key_is_refused() {
        let p = publishers();
        for (provenance, names) in [
            (
                from(Some("school-service"), "ab.claim", None),
                "\"school-service\" may not publish ab_claim",
            ),
            (from(None, "ab.claim", None), "no AMQP user_id"),
            (
                from(Some("ab-service"), "school.registration", None),
                "routing key \"ab.claim\"",
            ),
        ] {
            let refused = p.authorise(MessageKind::AbClaim, &provenance).unwrap_err();
            assert_eq!(refused.reason, ReasonCode::UnauthorisedPublisher);
            assert!(refused.detail.contains(names), "{}", refused.detail);
        }
    }

    #[test]
    fn the_original_publisher_is_believed_on_an_operator_replay_only() {
        let p = publishers();
        let replay = from(Some("induction-operator"), "ab.claim", Some("ab-service"));
        assert_eq!(
            p.authorise(MessageKind::AbClaim, &replay).unwrap(),
            "ab-service"
        );
        let forged = from(Some("school-service"), "ab.claim", Some("ab-service"));
        assert!(p.authorise(MessageKind::AbClaim, &forged).is_err());
        let replay_of_school = from(
            Some("induction-operator"),
            "ab.claim",
            Some("school-service"),
        );
        assert!(
            p.authorise(MessageKind::AbClaim, &replay_of_school)
                .is_err()
        );
        // An operator's own message without the header is judged as the operator's.
        let own = from(Some("induction-operator"), "ab.claim", None);
        assert!(p.authorise(MessageKind::AbClaim, &own).is_err());
    }
}
