//! Store failures, split into transient (wait and retry) and permanent (count an attempt).

use std::fmt;

/// A failure of the database layer.
///
/// The text never includes row data: a Postgres error is described by its SQLSTATE and the
/// constraint or table it names, because a failing row's detail could contain a TRN.
#[derive(Debug)]
pub struct StoreError {
    transient: bool,
    description: String,
}

impl StoreError {
    /// True when retrying later may succeed (connection lost, database restarting, deadlock).
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// A failure that retrying will resolve (a race with another worker).
    pub fn transient(what: impl Into<String>) -> Self {
        Self {
            transient: true,
            description: what.into(),
        }
    }

    /// A permanent failure that did not come from sqlx (a stored row that cannot be read).
    pub fn corrupt(what: impl Into<String>) -> Self {
        Self {
            transient: false,
            description: what.into(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.transient {
            "unavailable"
        } else {
            "failed"
        };
        write!(f, "database {kind}: {}", self.description)
    }
}

impl std::error::Error for StoreError {}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        use sqlx::Error as E;
        let (transient, description) = match &error {
            E::Io(e) => (true, format!("I/O error: {}", e.kind())),
            E::Tls(_) => (true, "TLS error".to_owned()),
            E::PoolTimedOut => (true, "timed out waiting for a connection".to_owned()),
            E::PoolClosed => (true, "connection pool closed".to_owned()),
            E::WorkerCrashed => (true, "connection worker crashed".to_owned()),
            E::Protocol(_) => (true, "protocol error (connection lost?)".to_owned()),
            E::Database(db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                let transient = is_transient_sqlstate(&code);
                let mut description = format!("SQLSTATE {code}");
                if let Some(constraint) = db.constraint() {
                    description.push_str(&format!(" (constraint {constraint})"));
                } else if let Some(table) = db.table() {
                    description.push_str(&format!(" (table {table})"));
                }
                (transient, description)
            }
            E::Migrate(e) => (false, format!("migration failed: {e}")),
            E::Configuration(_) => (false, "configuration error".to_owned()),
            E::RowNotFound => (false, "row not found".to_owned()),
            E::ColumnDecode { index, .. } => (false, format!("cannot decode column {index}")),
            E::ColumnNotFound(name) => (false, format!("column {name} not found")),
            E::Decode(_) => (false, "cannot decode a value".to_owned()),
            E::Encode(_) => (false, "cannot encode a value".to_owned()),
            other => (false, format!("{:?}", std::mem::discriminant(other))),
        };
        Self {
            transient,
            description,
        }
    }
}

/// SQLSTATEs after which the same statement may succeed later.
fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources
        || code.starts_with("57P") // operator intervention: shutdown, cannot connect now
        || code.starts_with("58") // system error
        || matches!(code, "40001" | "40P01" | "55P03" | "55006" | "25006")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sqlstates() {
        for code in [
            "08006", "57P01", "57P03", "53300", "40001", "40P01", "25006",
        ] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "23514", "22P02", "42P01"] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!StoreError::from(sqlx::Error::RowNotFound).is_transient());
    }
}
