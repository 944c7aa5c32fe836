//! First entry wins across handler lanes. With one lane, of two entries carrying one event id the
//! earlier one is applied and the later one is a duplicate. Lanes apply batches at once, so a
//! later batch could commit an id before the earlier batch that also carries it. Here batches
//! take their turn in read order, and a batch that shares an id with an earlier batch still being
//! applied waits for that batch to finish. Batches sharing no id (nearly all) never wait for one
//! another's statements.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use uuid::Uuid;

#[derive(Debug, Default)]
struct State {
    /// The ticket whose turn comes next (tickets are handed out in read order from 0).
    next: u64,
    /// The event ids of the batches being applied, by ticket.
    applying: BTreeMap<u64, HashSet<Uuid>>,
}

/// The batches being applied, shared by the lanes.
#[derive(Debug, Default, Clone)]
pub struct Overlap {
    state: Arc<(Mutex<State>, Notify)>,
}

/// A batch's turn: while held, later batches sharing an id with it wait.
#[derive(Debug)]
pub struct Turn {
    overlap: Overlap,
    ticket: u64,
}

impl Overlap {
    /// Waits until every earlier ticket has taken its turn and none still being applied shares
    /// an id with `ids`, then holds the turn of batch `ticket` until the guard is dropped. Every
    /// ticket must take its turn once, or the later ones wait for ever.
    pub async fn enter(&self, ticket: u64, ids: HashSet<Uuid>) -> Turn {
        let (state, changed) = &*self.state;
        loop {
            // Registered before the check, so a change between the check and the wait is seen.
            let notified = changed.notified();
            {
                let mut s = state.lock().expect("overlap lock");
                debug_assert!(ticket >= s.next, "ticket {ticket} took its turn twice");
                let free = s.applying.values().all(|other| other.is_disjoint(&ids));
                if s.next == ticket && free {
                    s.applying.insert(ticket, ids);
                    s.next = ticket + 1;
                    changed.notify_waiters();
                    return Turn {
                        overlap: self.clone(),
                        ticket,
                    };
                }
            }
            notified.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let (state, changed) = &*self.overlap.state;
        state
            .lock()
            .expect("overlap lock")
            .applying
            .remove(&self.ticket);
        changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn batches_take_turns_in_read_order_and_wait_only_on_shared_ids() {
        let overlap = Overlap::default();
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let spawn = |ticket: u64, ids: HashSet<Uuid>| {
            let overlap = overlap.clone();
            tokio::spawn(async move { overlap.enter(ticket, ids).await })
        };
        let settle = || tokio::time::sleep(Duration::from_millis(50));

        // Batch 1 arrives before batch 0 has taken its turn: it waits for it.
        let one = spawn(1, [c].into());
        settle().await;
        assert!(!one.is_finished());
        let zero = overlap.enter(0, [a, b].into()).await;
        let one = one.await.unwrap(); // no shared id: applies alongside batch 0

        // Batch 2 shares `b` with batch 0, still being applied: it waits for it.
        let two = spawn(2, [b].into());
        settle().await;
        assert!(!two.is_finished());
        drop(zero);
        let two = tokio::time::timeout(Duration::from_secs(1), two)
            .await
            .expect("released when batch 0 is done")
            .unwrap();
        drop((one, two));
    }
}
