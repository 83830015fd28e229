//! Offset bookkeeping for at-least-once delivery.
//!
//! Every consumed message gets an [`Ack`] that travels with its frame through the stages. The sink calls
//! [`Ack::delivered`] once the broker has acknowledged every output of that frame (result and map, or the
//! dead-letter record). For each partition, the committable offset is the lowest offset still in flight
//! (or one past the highest seen when nothing is): offsets never pass a frame whose outputs are not
//! durably published, whatever order frames finish in. An `Ack` dropped without `delivered` (a crash path,
//! a forced shutdown) keeps blocking its partition, so the frame is consumed again after a restart
//! rather than lost.
//!
//! The `Ack` also holds the frame's in-flight permit: the source may only consume while permits are left,
//! which bounds memory across all stages (see `source`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::OwnedSemaphorePermit;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Bumped on every assignment, so that acks of frames consumed under an earlier assignment of the
    /// same partition cannot move the offsets of the new one.
    generation: u64,
    /// Offsets consumed and not yet acknowledged, with when they were consumed.
    in_flight: BTreeMap<i64, Instant>,
    /// One past the highest offset consumed in this generation.
    next_offset: Option<i64>,
    /// The last offset handed out for committing.
    committed: Option<i64>,
}

impl PartitionState {
    fn committable(&self) -> Option<i64> {
        self.in_flight.keys().next().copied().or(self.next_offset)
    }
}

/// Shared between the source (registers, commits) and the sink (acknowledges).
#[derive(Debug, Clone, Default)]
pub struct OffsetTracker {
    inner: Arc<Mutex<Tracked>>,
}

#[derive(Debug, Default)]
struct Tracked {
    partitions: HashMap<TopicPartition, PartitionState>,
    generations: u64,
}

impl OffsetTracker {
    pub fn new() -> OffsetTracker {
        OffsetTracker::default()
    }

    /// The bookkeeping stays consistent even if a holder panicked mid-update (every update is a single
    /// insert or remove), so a poisoned lock is taken over rather than propagated.
    fn lock(&self) -> MutexGuard<'_, Tracked> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A partition was assigned to this consumer: start fresh bookkeeping for it.
    pub fn assign(&self, tp: TopicPartition) {
        let mut tracked = self.lock();
        tracked.generations += 1;
        let generation = tracked.generations;
        tracked.partitions.insert(tp, PartitionState { generation, ..PartitionState::default() });
    }

    /// A partition was revoked: forget it (its remaining frames are still published; their acks are
    /// ignored, and the new owner consumes from the last commit: at-least-once).
    pub fn revoke(&self, tp: &TopicPartition) {
        self.lock().partitions.remove(tp);
    }

    /// Records a consumed message; the frame must later be acknowledged through the returned handle.
    pub fn register(&self, tp: TopicPartition, offset: i64, permit: Option<OwnedSemaphorePermit>) -> Ack {
        let mut tracked = self.lock();
        let generations = tracked.generations;
        let state = tracked.partitions.entry(tp.clone()).or_insert_with(|| PartitionState {
            // A message before its assignment callback (possible with manual assignment): track it anyway.
            generation: generations,
            ..PartitionState::default()
        });
        state.in_flight.insert(offset, Instant::now());
        state.next_offset = Some(state.next_offset.map_or(offset + 1, |next| next.max(offset + 1)));
        Ack { tracker: self.clone(), tp, offset, generation: state.generation, _permit: permit }
    }

    fn complete(&self, tp: &TopicPartition, offset: i64, generation: u64) {
        if let Some(state) = self.lock().partitions.get_mut(tp) {
            if state.generation == generation {
                state.in_flight.remove(&offset);
            }
        }
    }

    /// Offsets (the next offset to consume, Kafka's convention) that may be committed and were not
    /// handed out before; marks them as handed out.
    pub fn take_committable(&self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, state) in self.lock().partitions.iter_mut() {
            if let Some(offset) = state.committable() {
                if state.committed.is_none_or(|done| offset > done) {
                    state.committed = Some(offset);
                    out.push((tp.clone(), offset));
                }
            }
        }
        out.sort();
        out
    }

    /// Committable offsets of some partitions, whether or not handed out before (for a revocation).
    pub fn committable_for(&self, partitions: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let tracked = self.lock();
        partitions
            .iter()
            .filter_map(|tp| tracked.partitions.get(tp).and_then(|s| s.committable()).map(|o| (tp.clone(), o)))
            .collect()
    }

    /// Every committable offset, whether or not handed out before (the last commit at shutdown).
    pub fn all_committable(&self) -> Vec<(TopicPartition, i64)> {
        let mut out: Vec<_> = self
            .lock()
            .partitions
            .iter()
            .filter_map(|(tp, state)| state.committable().map(|offset| (tp.clone(), offset)))
            .collect();
        out.sort();
        out
    }

    /// Frames consumed but not yet acknowledged, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.lock().partitions.values().map(|s| s.in_flight.len()).sum()
    }

    /// How long the oldest unacknowledged frame has been in flight: a line that makes progress keeps this
    /// near its latency; a stuck one lets it grow without bound.
    pub fn oldest_in_flight(&self) -> Option<Duration> {
        let tracked = self.lock();
        let oldest = tracked.partitions.values().flat_map(|state| state.in_flight.values()).min()?;
        Some(oldest.elapsed())
    }
}

/// The obligation to report that a frame's outputs are durably published.
#[derive(Debug)]
pub struct Ack {
    tracker: OffsetTracker,
    tp: TopicPartition,
    offset: i64,
    generation: u64,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Ack {
    /// Every output of this frame is acknowledged by the broker: its offset may be committed.
    pub fn delivered(self) {
        self.tracker.complete(&self.tp, self.offset, self.generation);
    }

    pub fn position(&self) -> (&TopicPartition, i64) {
        (&self.tp, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(partition: i32) -> TopicPartition {
        TopicPartition { topic: "frames".into(), partition }
    }

    #[test]
    fn offsets_never_pass_an_unacknowledged_frame() {
        let tracker = OffsetTracker::new();
        tracker.assign(tp(0));
        let acks: Vec<Ack> = (10..15).map(|o| tracker.register(tp(0), o, None)).collect();
        assert_eq!(tracker.take_committable(), vec![(tp(0), 10)]);
        let mut acks = acks.into_iter();
        let first = acks.next().unwrap();
        // 11..14 finish first: still blocked by 10.
        for ack in acks {
            ack.delivered();
        }
        assert_eq!(tracker.take_committable(), vec![]);
        first.delivered();
        assert_eq!(tracker.take_committable(), vec![(tp(0), 15)]);
        assert_eq!(tracker.take_committable(), vec![], "nothing new to commit");
        assert_eq!(tracker.in_flight(), 0);
    }

    #[test]
    fn the_oldest_unacknowledged_frame_is_tracked_until_acknowledged() {
        let tracker = OffsetTracker::new();
        assert_eq!(tracker.oldest_in_flight(), None);
        let first = tracker.register(tp(0), 1, None);
        let second = tracker.register(tp(1), 7, None);
        assert!(tracker.oldest_in_flight().is_some(), "two frames in flight");
        first.delivered();
        assert!(tracker.oldest_in_flight().is_some(), "one frame still in flight on another partition");
        second.delivered();
        assert_eq!(tracker.oldest_in_flight(), None);
    }

    #[test]
    fn a_dropped_ack_keeps_its_frame_uncommitted() {
        let tracker = OffsetTracker::new();
        tracker.assign(tp(0));
        let lost = tracker.register(tp(0), 3, None);
        tracker.register(tp(0), 4, None).delivered();
        drop(lost);
        assert_eq!(tracker.take_committable(), vec![(tp(0), 3)]);
        assert_eq!(tracker.in_flight(), 1);
    }

    #[test]
    fn partitions_are_independent() {
        let tracker = OffsetTracker::new();
        tracker.assign(tp(0));
        tracker.assign(tp(1));
        let _slow = tracker.register(tp(0), 0, None);
        tracker.register(tp(1), 7, None).delivered();
        assert_eq!(tracker.take_committable(), vec![(tp(0), 0), (tp(1), 8)]);
    }

    #[test]
    fn acks_from_an_earlier_assignment_are_ignored() {
        let tracker = OffsetTracker::new();
        tracker.assign(tp(0));
        let stale = tracker.register(tp(0), 5, None);
        tracker.revoke(&tp(0));
        tracker.assign(tp(0));
        let fresh = tracker.register(tp(0), 5, None);
        stale.delivered();
        assert_eq!(tracker.committable_for(&[tp(0)]), vec![(tp(0), 5)], "the new owner's frame 5 still blocks");
        fresh.delivered();
        assert_eq!(tracker.committable_for(&[tp(0)]), vec![(tp(0), 6)]);
    }

    #[test]
    fn the_permit_is_released_with_the_ack() {
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let tracker = OffsetTracker::new();
        let permit = permits.clone().try_acquire_owned().unwrap();
        let ack = tracker.register(tp(0), 0, Some(permit));
        assert_eq!(permits.available_permits(), 0);
        ack.delivered();
        assert_eq!(permits.available_permits(), 1);
    }
}
