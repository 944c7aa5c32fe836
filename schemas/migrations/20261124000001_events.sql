-- The system of record: one row per distinct event id, traceable to its stream entry.
CREATE TABLE IF NOT EXISTS events (
    event_id       uuid        PRIMARY KEY,
    channel        text        NOT NULL,
    type           text        NOT NULL,
    source         text        NOT NULL,
    occurred_at    timestamptz NOT NULL,
    data           jsonb       NOT NULL,
    stream         text        NOT NULL,
    stream_id      text        NOT NULL,
    correlation_id text        NULL,
    persisted_at   timestamptz NOT NULL DEFAULT now()
);

-- Where each (stream, group) has got to; written in the same transaction as the events.
CREATE TABLE IF NOT EXISTS checkpoints (
    stream     text        NOT NULL,
    group_name text        NOT NULL,
    position   text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, group_name)
);
