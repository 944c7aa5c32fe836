//! The `events` table read back, for the operator's tools (`fleetctl trace`, `reconcile`, `replay
//! --from-postgres`): a worker only ever inserts.

use std::collections::HashSet;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::store::EventStore;
use crate::stream::EntryId;

/// One row of `events`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event_id: Uuid,
    pub channel: String,
    pub event_type: String,
    pub source: String,
    pub occurred_at: OffsetDateTime,
    /// The `data` object as JSON text.
    pub data: String,
    pub stream: String,
    /// The entry it was persisted from (the first copy, for a producer's retries).
    pub stream_id: String,
    pub correlation_id: Option<String>,
    pub persisted_at: OffsetDateTime,
}

type Row = (
    Uuid,
    String,
    String,
    String,
    OffsetDateTime,
    String,
    String,
    String,
    Option<String>,
    OffsetDateTime,
);

const COLUMNS: &str = "event_id, channel, type, source, occurred_at, data::text, stream, stream_id, correlation_id, persisted_at";

fn stored(r: Row) -> StoredEvent {
    StoredEvent {
        event_id: r.0,
        channel: r.1,
        event_type: r.2,
        source: r.3,
        occurred_at: r.4,
        data: r.5,
        stream: r.6,
        stream_id: r.7,
        correlation_id: r.8,
        persisted_at: r.9,
    }
}

impl EventStore {
    /// The row of `event_id`, if persisted.
    pub async fn event(&self, event_id: Uuid) -> Result<Option<StoredEvent>, sqlx::Error> {
        let row: Option<Row> =
            sqlx::query_as(&format!("SELECT {COLUMNS} FROM events WHERE event_id = $1"))
                .bind(event_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(stored))
    }

    /// Which of `ids` have a row.
    pub async fn existing(&self, ids: &[Uuid]) -> Result<HashSet<Uuid>, sqlx::Error> {
        let found: Vec<Uuid> =
            sqlx::query_scalar("SELECT event_id FROM events WHERE event_id = ANY($1)")
                .bind(ids)
                .fetch_all(&self.pool)
                .await?;
        Ok(found.into_iter().collect())
    }

    /// Up to `limit` rows persisted from `stream`, in the order of their entries, after the entry
    /// `after` (a page of a walk through the stream's rows).
    pub async fn events_of_stream(
        &self,
        stream: &str,
        after: Option<EntryId>,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let (ms, seq) = after.map_or((-1, 0), |a| (a.ms as i128, a.seq as i128));
        // Entry ids compare as two numbers; numeric holds u64 whole.
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM events WHERE stream = $1
               AND (split_part(stream_id, '-', 1)::numeric, split_part(stream_id, '-', 2)::numeric)
                 > ($2::text::numeric, $3::text::numeric)
             ORDER BY split_part(stream_id, '-', 1)::numeric, split_part(stream_id, '-', 2)::numeric
             LIMIT $4"
        ))
        .bind(stream)
        .bind(ms.to_string())
        .bind(seq.to_string())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(stored).collect())
    }
}
