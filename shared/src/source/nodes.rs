//! A cluster's readers. Streams go to the master that serves their hash slot; each group of
//! streams a reader takes (one slot, or with many slots one master's) has a `NodeReader` of its
//! own, on a connection of its own, in a task of its own: its blocking reads wait on its master
//! alone, and whichever reader has entries first hands them over. Each reader has at most one
//! read in flight and one batch waiting to be taken, so memory stays bounded by the readers.
//!
//! The slot map is read when the readers are planned, and again after any read that says it may
//! have changed (`MOVED` after a reshard, `CLUSTERDOWN` or a master that stops answering during a
//! failover): the readers are planned anew, new ones start on the masters that serve the slots
//! now, and the others stop after their read in flight (whose entries are still handed over:
//! they are pending for this consumer, and applying them is as right as anywhere).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::runtime::conn::{Conn, Master};
use crate::source::read::{Consumer, NodeReader};
use crate::source::read_conn::ReadConn;
use crate::source::{Read, SourceError, StreamLabels};
use crate::stream::keys::slot;

/// With at most this many slots to read, each slot gets a reader of its own (every read blocks);
/// beyond, each master gets one, which polls its slots in turn (`poll_interval_ms`).
const MOST_SLOT_READERS: usize = 16;

/// A reader's identity: its master, and its slot when it reads one only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ReaderKey {
    host: String,
    port: u16,
    slot: Option<u16>,
}

/// What a reader is asked to read next: the streams it has, and those of them it may read.
struct Go {
    assigned: Vec<Arc<str>>,
    readable: Vec<Arc<str>>,
}

/// A read done: the entries (or why not) and the streams it named.
struct Done {
    key: ReaderKey,
    result: Result<Read, SourceError>,
    slice: Vec<Arc<str>>,
}

/// One running reader.
struct Running {
    go: mpsc::Sender<Go>,
    /// A read asked and not yet handed over.
    busy: bool,
}

/// The readers of a cluster.
pub(crate) struct ClusterReaders {
    /// The settings every reader's connection copies (credentials, TLS, name, limits).
    template: ReadConn,
    conn: Conn,
    who: Arc<Consumer>,
    labels: StreamLabels,
    /// The slot map the readers were planned on; `None` when it must be read again.
    masters: Option<Vec<Master>>,
    running: HashMap<ReaderKey, Running>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

impl ClusterReaders {
    /// Readers whose connections copy `template`'s settings.
    pub fn new(template: ReadConn, conn: Conn, who: Arc<Consumer>, labels: StreamLabels) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        ClusterReaders {
            template,
            conn,
            who,
            labels,
            masters: None,
            running: HashMap::new(),
            done_tx,
            done_rx,
        }
    }

    /// The next read done by any reader of `streams` (sorted), of which `readable` may be read,
    /// and the streams it named.
    pub async fn read(
        &mut self,
        streams: &[Arc<str>],
        readable: &[Arc<str>],
    ) -> (Result<Read, SourceError>, Vec<Arc<str>>) {
        if self.masters.is_none() {
            match self.conn.masters().await {
                Ok(masters) => self.masters = masters,
                Err(e) => return (Err(e.into()), Vec::new()),
            }
        }
        let plan = plan(self.masters.as_deref().unwrap_or_default(), streams);
        // Readers no longer planned stop after their read in flight.
        self.running.retain(|key, _| plan.contains_key(key));
        for (key, assigned) in plan {
            let running = match self.running.get_mut(&key) {
                Some(running) => running,
                None => {
                    let running = self.start(key.clone());
                    self.running.entry(key.clone()).or_insert(running)
                }
            };
            if running.busy {
                continue;
            }
            let readable: Vec<Arc<str>> = assigned
                .iter()
                .filter(|s| readable.binary_search(s).is_ok())
                .cloned()
                .collect();
            if running.go.send(Go { assigned, readable }).await.is_ok() {
                running.busy = true;
            }
        }
        if !self.running.values().any(|r| r.busy) {
            // No reader has a read in flight: no master serves the streams' slots now (a
            // failover under way). Wait as a read would, then read the slot map again.
            self.masters = None;
            tokio::time::sleep(std::time::Duration::from_millis(self.who.tuning.block_ms)).await;
            return (Ok(Read::default()), Vec::new());
        }
        let Some(done) = self.done_rx.recv().await else {
            return (Ok(Read::default()), Vec::new());
        };
        if let Some(running) = self.running.get_mut(&done.key) {
            running.busy = false;
        }
        if let Err(e) = &done.result {
            if e.may_have_moved() {
                tracing::info!(error = %e, reader = ?done.key, "the cluster's slot map may have changed: planning the readers again");
                self.masters = None;
            }
        }
        (done.result, done.slice)
    }

    /// Starts the reader `key`.
    fn start(&self, key: ReaderKey) -> Running {
        tracing::info!(host = %key.host, port = key.port, slot = ?key.slot, "reader started");
        let reader = NodeReader::new(
            self.template.to_node(&key.host, key.port),
            self.conn.clone(),
            self.who.clone(),
            self.labels.clone(),
            true,
        );
        let (go, orders) = mpsc::channel(1);
        tokio::spawn(run(reader, orders, self.done_tx.clone(), key));
        Running { go, busy: false }
    }
}

/// A reader's task: a read per order, until the orders stop.
async fn run(
    mut reader: NodeReader,
    mut orders: mpsc::Receiver<Go>,
    done: mpsc::UnboundedSender<Done>,
    key: ReaderKey,
) {
    while let Some(Go { assigned, readable }) = orders.recv().await {
        let result = reader.read(&assigned, &readable).await;
        let slice = std::mem::take(&mut reader.last_slice);
        if done
            .send(Done {
                key: key.clone(),
                result,
                slice,
            })
            .is_err()
        {
            break;
        }
    }
}

/// Which reader reads which streams: one per slot while there are few slots, else one per master.
fn plan(masters: &[Master], streams: &[Arc<str>]) -> BTreeMap<ReaderKey, Vec<Arc<str>>> {
    let mut by_slot: BTreeMap<u16, Vec<Arc<str>>> = BTreeMap::new();
    for s in streams {
        by_slot.entry(slot(s)).or_default().push(s.clone());
    }
    let per_slot = by_slot.len() <= MOST_SLOT_READERS;
    let mut plan: BTreeMap<ReaderKey, Vec<Arc<str>>> = BTreeMap::new();
    for (slot, streams) in by_slot {
        // A slot no master serves (a failover under way): read it when one does.
        let Some(master) = masters.iter().find(|m| m.serves(slot)) else {
            continue;
        };
        let key = ReaderKey {
            host: master.host.clone(),
            port: master.port,
            slot: per_slot.then_some(slot),
        };
        let assigned = plan.entry(key).or_default();
        assigned.extend(streams);
        assigned.sort();
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masters() -> Vec<Master> {
        let m = |port, a, b| Master {
            host: "h".into(),
            port,
            slots: vec![(a, b)],
        };
        vec![m(1, 0, 5460), m(2, 5461, 10922), m(3, 10923, 16383)]
    }

    #[test]
    fn few_slots_get_a_reader_each_on_the_master_that_serves_them() {
        // {0}: 13907 (third master), {1}: 9842 and {2}: 5649 (both the second).
        let streams: Vec<Arc<str>> = ["e:{0}", "e:{1}", "e:{2}", "f:{1}"]
            .map(Arc::from)
            .into_iter()
            .collect();
        let plan = plan(&masters(), &streams);
        let got: Vec<(u16, Option<u16>, Vec<&str>)> = plan
            .iter()
            .map(|(k, v)| (k.port, k.slot, v.iter().map(|s| &**s).collect()))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, Some(5649), vec!["e:{2}"]),
                (2, Some(9842), vec!["e:{1}", "f:{1}"]),
                (3, Some(13907), vec!["e:{0}"]),
            ]
        );
    }

    #[test]
    fn many_slots_get_a_reader_per_master() {
        let streams: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("s{i}"))).collect();
        let plan = plan(&masters(), &streams);
        assert!(plan.len() <= 3 && plan.keys().all(|k| k.slot.is_none()));
        assert_eq!(plan.values().map(Vec::len).sum::<usize>(), 100);
    }

    #[test]
    fn a_slot_no_master_serves_waits() {
        let mut partial = masters();
        partial.remove(2);
        let streams: Vec<Arc<str>> = vec![Arc::from("e:{0}")];
        assert!(plan(&partial, &streams).is_empty());
    }
}
