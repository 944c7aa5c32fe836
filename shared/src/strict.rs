//! The persister's handler: events on strict routes become rows in PostgreSQL, committed with the
//! checkpoints before the pipeline acknowledges anything.

use crate::handler::{Applied, Batch, Handler, HandlerError};
use crate::store::{EventRows, EventStore};

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

fn transient(e: sqlx::Error) -> HandlerError {
    HandlerError::Transient(format!("postgres: {e}"))
}

/// PostgreSQL errors caused by the data itself (SQLSTATE classes 22 data exception, 23 integrity,
/// 54 program limit) are permanent for the event; everything else (connection, 40 rollback,
/// 53 resources, 57 operator intervention, ...) is worth retrying.
fn classify(e: sqlx::Error) -> HandlerError {
    let permanent = match &e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    };
    if permanent {
        HandlerError::Permanent(format!("postgres rejected the event: {e}"))
    } else {
        transient(e)
    }
}

impl Handler for StrictSink {
    async fn prepare(&mut self) -> Result<(), HandlerError> {
        if !self.migrate {
            return self.check().await;
        }
        use sqlx::migrate::MigrateError;
        match self.store.migrate().await {
            Ok(()) => {
                tracing::info!("migrations applied");
                Ok(())
            }
            Err(MigrateError::Execute(e)) => Err(transient(e)),
            Err(e) => Err(HandlerError::Fatal(format!("migrations: {e}"))),
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
        let inserted = self
            .store
            .persist(&rows, batch.group, &batch.checkpoints)
            .await
            .map_err(classify)? as usize;
        Ok(Applied {
            applied: inserted,
            duplicates: rows.len() - inserted,
            skipped,
        })
    }

    async fn check(&self) -> Result<(), HandlerError> {
        self.store.ping().await.map_err(transient)
    }
}
