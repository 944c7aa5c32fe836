//! The persister's handler: events on strict routes become rows in PostgreSQL, committed with the
//! checkpoints before the pipeline acknowledges anything.

use streamfleet::store::{EventRows, EventStore};
use streamfleet::EntryId;
use streamfleet::{Applied, Batch, Handler, HandlerError};

/// Writes strict events to `events`; acknowledges other routes with no effect.
#[derive(Debug, Clone)]
pub struct StrictSink {
    store: EventStore,
    migrate: bool,
}

impl StrictSink {
    /// A sink over `store`; `migrate` applies the embedded migrations before the first read.
    pub fn new(store: EventStore, migrate: bool) -> Self {
        StrictSink { store, migrate }
    }
}

/// What a PostgreSQL error means for the batch that met it (see `HandlerError`):
/// - the data itself (SQLSTATE classes 22 data exception, 23 integrity, 54 program limit, or a
///   value that cannot be encoded): permanent for the event;
/// - the sink refuses the worker's statements (42 syntax or access rule: a missing privilege,
///   table or column; 28 authorization; 3D/3F catalog or schema): misconfigured;
/// - the sink cannot take anything now (no connection, 08 connection, 53 resources but out of
///   memory, 57 operator intervention but a statement timeout, 58 system, 25006 read-only after a
///   failover): unavailable;
/// - anything else (40 rollback: serialization failure, deadlock; a statement timeout): transient.
fn classify(e: sqlx::Error) -> HandlerError {
    let code = match &e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        sqlx::Error::Encode(_) => {
            return HandlerError::Permanent(format!("postgres rejected the event: {e}"))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => return HandlerError::Unavailable(format!("postgres: {e}")),
        _ => None,
    };
    let Some(code) = code else {
        return HandlerError::Transient(format!("postgres: {e}"));
    };
    let class = &code[..2.min(code.len())];
    match class {
        "22" | "23" | "54" => HandlerError::Permanent(format!("postgres rejected the event: {e}")),
        "42" | "28" | "3D" | "3F" => HandlerError::Misconfigured(format!(
            "postgres refuses the worker's statements (SQLSTATE {code}): {e}"
        )),
        "08" | "58" => HandlerError::Unavailable(format!("postgres: {e}")),
        "53" if code != "53200" => HandlerError::Unavailable(format!("postgres: {e}")),
        "57" if code != "57014" => HandlerError::Unavailable(format!("postgres: {e}")),
        _ if code == "25006" => HandlerError::Unavailable(format!("postgres is read-only: {e}")),
        _ => HandlerError::Transient(format!("postgres: {e}")),
    }
}

impl Handler for StrictSink {
    /// Applies the migrations (unless skipped), then checks that the role may run the very
    /// statement every batch runs: a missing privilege or table stops the worker at start (exit 2)
    /// with the role and the table named, instead of failing every batch later.
    async fn prepare(&mut self) -> Result<(), HandlerError> {
        use sqlx::migrate::MigrateError;
        if self.migrate {
            match self.store.migrate().await {
                Ok(()) => tracing::info!("migrations applied"),
                Err(MigrateError::Execute(e)) => {
                    return Err(match classify(e) {
                        HandlerError::Misconfigured(m) => HandlerError::Misconfigured(format!(
                            "FLEET_DATABASE_URL: migrations cannot be applied ({m}); apply them with `fleetctl migrate` as a role that may, and start with --skip-migrations"
                        )),
                        other => other,
                    })
                }
                Err(e) => return Err(HandlerError::Fatal(format!("migrations: {e}"))),
            }
        }
        let role = self.store.role().await.map_err(classify)?;
        match self.store.persist(&EventRows::default(), "", &[]).await {
            Ok(_) => Ok(()),
            Err(e) => Err(match classify(e) {
                HandlerError::Misconfigured(m) => HandlerError::Misconfigured(format!(
                    "FLEET_DATABASE_URL: role {role:?} cannot write events and checkpoints: {m}{}",
                    if self.migrate {
                        ""
                    } else {
                        " (were the migrations applied? `fleetctl migrate`)"
                    }
                )),
                other => other,
            }),
        }
    }

    async fn apply(&mut self, batch: &Batch<'_>) -> Result<Applied, HandlerError> {
        let mut rows = EventRows::default();
        let mut skipped = 0;
        for r in &batch.events {
            if !r.route.strict {
                skipped += 1;
                continue;
            }
            let e = r.event;
            rows.ids.push(e.id);
            rows.channels.push(&e.channel);
            rows.types.push(&e.event_type);
            rows.sources.push(&e.source);
            rows.times.push(e.time);
            rows.data.push(&e.data);
            rows.streams.push(r.stream);
            rows.stream_ids.push(r.entry_id.to_string());
            rows.correlation_ids.push(e.correlation_id.as_deref());
        }
        if rows.is_empty() && batch.checkpoints.is_empty() {
            // Nothing to write (e.g. a part of flow events only): no round trip.
            return Ok(Applied {
                skipped,
                ..Applied::default()
            });
        }
        let inserted = self
            .store
            .persist(&rows, batch.group, &batch.checkpoints)
            .await
            .map_err(classify)? as usize;
        Ok(Applied {
            applied: inserted,
            duplicates: rows.len() - inserted,
            skipped,
            ..Applied::default()
        })
    }

    async fn check(&self) -> Result<(), HandlerError> {
        self.store.ping().await.map_err(|e| match classify(e) {
            m @ HandlerError::Misconfigured(_) => m,
            other => HandlerError::Unavailable(other.to_string()),
        })
    }

    async fn checkpoint(&self, stream: &str, group: &str) -> Result<Option<EntryId>, HandlerError> {
        self.store.checkpoint(stream, group).await.map_err(classify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database error with only a SQLSTATE, as PostgreSQL reports them.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn sqlstates_decide_between_blaming_events_waiting_and_retrying() {
        let kind =
            |code: &'static str| match classify(sqlx::Error::Database(Box::new(Sqlstate(code)))) {
                HandlerError::Permanent(_) => "permanent",
                HandlerError::Misconfigured(_) => "misconfigured",
                HandlerError::Unavailable(_) | HandlerError::OutOfMemory(_) => "unavailable",
                HandlerError::Transient(_) => "transient",
                HandlerError::Fatal(_) => "fatal",
            };
        for (code, expected) in [
            ("22P05", "permanent"),     // \u0000 in jsonb
            ("23505", "permanent"),     // unique violation
            ("54000", "permanent"),     // program limit
            ("42501", "misconfigured"), // insufficient privilege
            ("42P01", "misconfigured"), // undefined table
            ("28000", "misconfigured"), // invalid authorization
            ("08006", "unavailable"),   // connection failure
            ("53100", "unavailable"),   // disk full
            ("57P01", "unavailable"),   // admin shutdown
            ("25006", "unavailable"),   // read-only (a standby)
            ("53200", "transient"),     // out of memory: maybe the batch
            ("57014", "transient"),     // statement timeout
            ("40001", "transient"),     // serialization failure
            ("40P01", "transient"),     // deadlock
            ("P0001", "transient"),     // raised by a trigger
        ] {
            assert_eq!(kind(code), expected, "{code}");
        }
        assert!(matches!(
            classify(sqlx::Error::PoolTimedOut),
            HandlerError::Unavailable(_)
        ));
    }
}
