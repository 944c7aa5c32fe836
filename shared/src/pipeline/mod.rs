//! The pipeline every worker runs: source → decode/validate → dedup → route → backpressure →
//! handler → confirm → acknowledge and checkpoint.
//!
//! Three stages overlap, joined by bounded channels: the reader fetches the next batch while the
//! handler lanes apply the parts of the previous ones and the acker acknowledges what they
//! confirmed. Each read is split by ordering key into one part per lane (`lanes`), so a key's
//! events are applied in stream order whatever `handler_concurrency` is.
//! Nothing is acknowledged before the handler has confirmed it (its effects are durable); a crash
//! anywhere before the acknowledgement leaves the entries pending: they are redelivered and,
//! effects being idempotent, applied once. Memory is bounded by the few parts in flight, whatever
//! the backlog. What a failure of the handler means is `policy`'s job; what an entry delivered too
//! often is, `trial`'s; where a replay may start, `watermark`'s.
//!
//! Settlement is per entry (`ack::Settlement`): the parts of one read are settled independently,
//! as their lanes confirm them, and an event that waits for its channel (`backpressure`) is
//! settled later, in a part of its own.

pub(crate) mod ack;
pub(crate) mod backpressure;
pub(crate) mod budget;
pub(crate) mod dlq;
pub(crate) mod handler;
pub(crate) mod inflight;
pub(crate) mod lanes;
pub(crate) mod policy;
pub(crate) mod process;
pub(crate) mod trial;
pub(crate) mod watermark;

use std::sync::Arc;
use std::time::Duration;

use crate::runtime::conn::Conn;
use tokio::sync::mpsc;

use crate::event::Limits;
use crate::pipeline::ack::Acker;
use crate::pipeline::backpressure::{BackpressureStage, Room};
use crate::pipeline::handler::{Handler, HandlerError};
use crate::pipeline::inflight::InFlight;
use crate::pipeline::lanes::{lanes, queue_len, split};
use crate::pipeline::policy::Applier;
use crate::pipeline::process::{Part, Processor};
use crate::pipeline::watermark::Watermarks;
use crate::runtime::backoff::backoff;
use crate::runtime::config::FileConfig;
use crate::runtime::health::{Dependency, Health};
use crate::runtime::shutdown::Shutdown;
use crate::source::Source;

/// A worker's pipeline around its handler.
pub struct Pipeline<H> {
    /// The consumer group.
    pub group: String,
    /// Reads batches (dedicated connection: it blocks).
    pub source: Source,
    /// Writes dead letters, acknowledgements and trial markers; keeps entries alive.
    pub writer: Conn,
    /// Routes, backpressure rules and tuning.
    pub config: Arc<FileConfig>,
    /// The worker's job.
    pub handler: H,
    /// Shared with `/readyz`.
    pub health: Arc<Health>,
}

impl<H: Handler> Pipeline<H> {
    /// Runs until the shutdown is triggered, then returns once every part read is settled or
    /// left pending. Fails only when the handler reports a fatal (or configuration) error while
    /// preparing.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), HandlerError> {
        let Pipeline {
            group,
            source,
            writer,
            config,
            handler,
            health,
        } = self;
        let consumer = source.consumer().to_owned();
        let streams: Vec<&str> = source.specs().iter().map(|s| s.as_str()).collect();
        let budget_prefix = crate::pipeline::budget::key_prefix(&streams, &group);
        let labels = source.labels();
        metrics::gauge!(crate::runtime::metrics::MAX_IN_FLIGHT)
            .set(config.tuning.max_in_flight as f64);
        let in_flight = InFlight::default();
        let watermarks = Watermarks::default();
        let mut processor = Processor {
            group: group.clone(),
            consumer: consumer.clone(),
            writer: writer.clone(),
            limits: Limits {
                max_data_bytes: config.tuning.max_data_bytes,
            },
            backpressure: Arc::new(BackpressureStage::new(
                config.backpressure.clone(),
                budget_prefix,
                Some(writer.clone()),
            )),
            config: config.clone(),
            applier: Applier {
                handler,
                health: health.clone(),
                timeout: Duration::from_millis(config.tuning.handler_timeout_ms),
                out_of_memory: false,
            },
            health: health.clone(),
            in_flight: in_flight.clone(),
            watermarks: watermarks.clone(),
            room: Room::default(),
            waiting_reported: 0,
        };
        if !processor.prepare(&shutdown).await? {
            health.drain();
            return Ok(());
        }
        processor
            .backpressure
            .check_grants()
            .await
            .map_err(HandlerError::Misconfigured)?;
        let (settle_tx, settle_rx) = mpsc::channel(1);
        let keeper = tokio::spawn(in_flight.clone().keep_alive(
            writer.clone(),
            group.clone(),
            consumer,
            Duration::from_millis(config.tuning.claim_idle_ms),
        ));
        // One queue per lane; lanes share the backpressure stage, so rate limits stay global.
        let mut queues = Vec::new();
        let mut lanes_running = tokio::task::JoinSet::new();
        for lane in 0..lanes(&config.tuning) {
            let (parts_tx, parts_rx) = mpsc::channel(queue_len(&config.tuning));
            queues.push(parts_tx);
            let mut processor = processor.clone();
            let (settle, shutdown) = (settle_tx.clone(), shutdown.clone());
            lanes_running
                .spawn(async move { processor.run(parts_rx, settle, &shutdown, lane == 0).await });
        }
        drop((processor, settle_tx));
        let reader = tokio::spawn(read(
            source,
            (config.tuning.batch_size, config.tuning.max_in_flight),
            queues,
            health.clone(),
            shutdown.clone(),
            in_flight.clone(),
            watermarks.clone(),
        ));
        let acker = tokio::spawn(
            Acker {
                conn: writer,
                group,
                health: health.clone(),
                shutdown: shutdown.clone(),
                in_flight,
                labels,
                watermarks,
            }
            .run(settle_rx),
        );
        lanes_running.join_all().await;
        let _ = reader.await;
        let _ = acker.await;
        keeper.abort();
        health.drain();
        tracing::info!("drained: no batch in flight");
        Ok(())
    }
}

/// The reader stage: batches in, split into one part per lane, until the drain starts. While
/// events wait for their channel, it reads only while a batch fits under `max_in_flight` with
/// what is in flight (the parts, bounded by the lanes' queues, and the waiting events).
async fn read(
    mut source: Source,
    (batch_size, max_in_flight): (usize, usize),
    lanes: Vec<mpsc::Sender<Part>>,
    health: Arc<Health>,
    shutdown: Shutdown,
    in_flight: InFlight,
    watermarks: Watermarks,
) {
    let mut delays = backoff();
    let mut streams = source.watch_streams();
    'reading: while !shutdown.is_triggered() {
        tokio::select! {
            _ = in_flight.room_for(batch_size, max_in_flight) => {}
            _ = shutdown.triggered() => break,
        }
        match source.read().await {
            Ok(mut read) => {
                health.up(Dependency::Redis);
                delays = backoff();
                if read.reclaimed {
                    // Entries still being processed here (their keep-alive lost a race) are not
                    // processed a second time.
                    read.entries
                        .retain(|e| !in_flight.contains(&e.stream, &e.id.to_string()));
                }
                if streams.has_changed().unwrap_or(false) {
                    watermarks.retain(&streams.borrow_and_update());
                }
                for (lane, part) in lanes.iter().zip(split(read.entries, lanes.len())) {
                    if part.is_empty() {
                        continue;
                    }
                    let ticket = in_flight.register(&part);
                    if lane.send((ticket, part)).await.is_err() {
                        break 'reading;
                    }
                }
            }
            Err(e) => {
                health.down(Dependency::Redis, &e);
                shutdown.sleep(delays.next().unwrap_or_default()).await;
            }
        }
    }
}
