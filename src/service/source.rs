//! The source: a Kafka consumer-group member that turns messages into [`RawFrame`]s for the preprocessing
//! pool, and the only place that commits offsets.
//!
//! - **Backpressure**: a frame takes an in-flight permit before it is consumed and returns it when its
//!   outputs are acknowledged (the permit rides in its [`Ack`](crate::service::ack::Ack)). With no permit left the
//!   consumer pauses its partitions; memory is bounded by `max_in_flight` frames across all stages.
//! - **Offsets**: auto-commit is off; every `commit_interval` the offsets that the tracker allows (never
//!   past an unpublished frame) are committed, again before partitions are revoked, and once more after the
//!   drain at shutdown.
//! - **Shutdown**: on stop, consumption ends and the channel to the pool closes, which cascades through the
//!   stages; the source keeps committing until the sink reports that everything was published.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::service::ack::{OffsetTracker, TopicPartition};
use crate::service::frame::{FrameMeta, RawFrame, SourcePosition, StageTimings, MAX_ID_BYTES};
use crate::service::metrics::{LineHealth, LineMetrics};

/// Receives librdkafka's callbacks for this line's consumer.
pub struct SourceContext {
    pub tracker: OffsetTracker,
    pub metrics: LineMetrics,
    pub health: Arc<LineHealth>,
}

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // librdkafka lists an internal partition -1 and reports -1 lag while unknown.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics.consumer_lag(topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let partitions = to_partitions(revoked);
            // Last chance to commit what this instance finished on these partitions; frames still in
            // flight are published anyway and the next owner sees them again (at-least-once).
            let offsets = self.tracker.committable_for(&partitions);
            if !offsets.is_empty() {
                let ok = consumer.commit(&to_list(&offsets), CommitMode::Sync).is_ok();
                self.metrics.offsets_committed(ok);
            }
            for tp in &partitions {
                self.tracker.revoke(tp);
            }
            log::info!("partitions revoked: {}", describe(&partitions));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                let partitions = to_partitions(assigned);
                for tp in &partitions {
                    self.tracker.assign(tp.clone());
                }
                self.health.joined_group.store(true, Ordering::Relaxed);
                log::info!("partitions assigned: {}", describe(&partitions));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(err) => log::error!("consumer group rebalance failed: {err}"),
        }
        let assigned = consumer.assignment().map(|list| list.count()).unwrap_or(0);
        self.metrics.partitions_assigned(assigned);
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(err) = &result {
            log::warn!("offset commit failed: {err} (retried with the next commit)");
        }
        self.metrics.offsets_committed(result.is_ok());
    }
}

fn to_partitions(list: &TopicPartitionList) -> Vec<TopicPartition> {
    list.elements().iter().map(|e| TopicPartition { topic: e.topic().to_string(), partition: e.partition() }).collect()
}

fn to_list(offsets: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (tp, offset) in offsets {
        // Adding a valid offset to a fresh list cannot fail.
        let _ = list.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset));
    }
    list
}

fn describe(partitions: &[TopicPartition]) -> String {
    if partitions.is_empty() {
        return "none".into();
    }
    partitions.iter().map(|tp| format!("{}/{}", tp.topic, tp.partition)).collect::<Vec<_>>().join(", ")
}

pub struct Source {
    pub line: String,
    pub consumer: StreamConsumer<SourceContext>,
    pub tracker: OffsetTracker,
    pub permits: Arc<Semaphore>,
    pub to_preprocess: Sender<RawFrame>,
    pub metrics: LineMetrics,
    pub commit_interval: Duration,
}

impl Source {
    /// Consumes until `stop` turns true (or the pool is gone, or the consumer fails fatally), then commits
    /// until `drained` brings the sink's outcome, then commits a last time synchronously. Returns why the
    /// line failed, if it did: a fatal consumer error, else the sink's error.
    pub async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        drained: oneshot::Receiver<Result<(), String>>,
    ) -> Result<(), String> {
        let Source { line, consumer, tracker, permits, to_preprocess, metrics, commit_interval } = self;
        let mut commits = tokio::time::interval(commit_interval);
        commits.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut paused = false;
        let mut failure = None;
        'consume: loop {
            if *stop.borrow() {
                break;
            }
            let permit = match permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    set_paused(&consumer, &metrics, &mut paused, true);
                    tokio::select! {
                        permit = permits.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break 'consume,
                        },
                        _ = stop.changed() => break 'consume,
                    }
                }
            };
            set_paused(&consumer, &metrics, &mut paused, false);
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = commits.tick() => commit_changed(&consumer, &tracker),
                message = consumer.recv() => match message {
                    Ok(message) => {
                        metrics.frame_received();
                        let frame = to_frame(&line, &message, &tracker, permit);
                        // The channel holds `max_in_flight` frames and every frame holds a permit, so it is
                        // never full; a closed channel means the pool stopped.
                        match to_preprocess.try_send(frame) {
                            Ok(()) => {}
                            Err(TrySendError::Full(_)) => log::error!("preprocess queue full despite the in-flight limit"),
                            Err(TrySendError::Disconnected(_)) => {
                                log::error!("line {line}: the preprocessing pool stopped; consumption ends");
                                break;
                            }
                        }
                    }
                    Err(err) => match crate::service::kafka::fatal_reason(consumer.client(), &err) {
                        // A fatal error never clears: end the line, which stops the process, so the
                        // orchestrator starts a fresh one.
                        Some(reason) => {
                            log::error!("line {line}: the consumer failed fatally ({reason}); the line stops");
                            failure = Some(format!("the consumer failed fatally: {reason}"));
                            break;
                        }
                        None => {
                            log::warn!("line {line}: consumer error: {err}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                },
            }
        }
        // Closing the pool's input starts the cascade that ends every stage of this line.
        drop(to_preprocess);
        let started = Instant::now();
        log::info!("line {line}: consumption stopped; draining {} in-flight frames", tracker.in_flight());
        tokio::pin!(drained);
        let published = loop {
            tokio::select! {
                published = &mut drained => {
                    break published.unwrap_or_else(|_| Err("the sink ended without an outcome (it panicked)".into()))
                }
                _ = commits.tick() => commit_changed(&consumer, &tracker),
            }
        };
        let drained_in = started.elapsed().as_secs_f64();
        match commit_all(&consumer, &tracker) {
            Ok(()) => log::info!("line {line}: drained in {drained_in:.1}s; offsets committed"),
            Err(err) => log::warn!(
                "line {line}: drained in {drained_in:.1}s, but the last offset commit failed ({err}): frames \
                 published since the previous commit will be consumed again"
            ),
        }
        consumer.unsubscribe();
        failure.map_or(published, Err)
    }
}

fn set_paused(consumer: &StreamConsumer<SourceContext>, metrics: &LineMetrics, paused: &mut bool, pause: bool) {
    if *paused == pause {
        return;
    }
    let result =
        consumer.assignment().and_then(
            |assigned| {
                if pause {
                    consumer.pause(&assigned)
                } else {
                    consumer.resume(&assigned)
                }
            },
        );
    match result {
        Ok(()) => {
            *paused = pause;
            metrics.consumer_paused(pause);
            log::debug!("consumer {}", if pause { "paused: in-flight limit reached" } else { "resumed" });
        }
        Err(err) => log::warn!("cannot {} the consumer: {err}", if pause { "pause" } else { "resume" }),
    }
}

/// Periodic commits are asynchronous (their outcome arrives in `commit_callback`, see
/// `kafka::commit_async`) and only send what changed since the last one.
fn commit_changed(consumer: &StreamConsumer<SourceContext>, tracker: &OffsetTracker) {
    let offsets = tracker.take_committable();
    if offsets.is_empty() {
        return;
    }
    if let Err(err) = crate::service::kafka::commit_async(consumer, &to_list(&offsets)) {
        log::warn!("offset commit failed: {err}");
        consumer.context().metrics.offsets_committed(false);
    }
}

/// The last commit waits, and sends everything, failed earlier attempts included.
fn commit_all(consumer: &StreamConsumer<SourceContext>, tracker: &OffsetTracker) -> KafkaResult<()> {
    let offsets = tracker.all_committable();
    if offsets.is_empty() {
        return Ok(());
    }
    let result = consumer.commit(&to_list(&offsets), CommitMode::Sync);
    consumer.context().metrics.offsets_committed(result.is_ok());
    result
}

fn to_frame(
    line: &str,
    message: &BorrowedMessage<'_>,
    tracker: &OffsetTracker,
    permit: OwnedSemaphorePermit,
) -> RawFrame {
    let source =
        SourcePosition { topic: message.topic().to_string(), partition: message.partition(), offset: message.offset() };
    let oversized_key = message.key().map(<[u8]>::len).filter(|len| *len > MAX_ID_BYTES);
    let frame_id = message
        .key()
        .filter(|_| oversized_key.is_none())
        .and_then(|key| std::str::from_utf8(key).ok())
        .filter(|key| !key.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| format!("{}/{}/{}", source.topic, source.partition, source.offset));
    let ack = tracker.register(
        TopicPartition { topic: source.topic.clone(), partition: source.partition },
        source.offset,
        Some(permit),
    );
    RawFrame {
        meta: FrameMeta {
            frame_id,
            line: line.to_string(),
            headers: crate::service::kafka::from_headers(message.headers()),
            source,
            received_at: Instant::now(),
            timings: StageTimings::default(),
        },
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        oversized_key,
        ack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::metrics::Metrics;

    /// librdkafka's in-process mock cluster stands in for the broker: this checks the source's own
    /// backpressure logic; tests/pipeline.rs covers the real broker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_consumer_pauses_at_the_in_flight_limit_and_resumes_when_frames_finish() {
        let keys: Vec<String> = (0..10).map(|i| format!("frame-{i}")).collect();
        let records: Vec<(&str, &[u8])> = keys.iter().map(|key| (key.as_str(), b"bytes".as_slice())).collect();
        let (_cluster, kafka) = crate::service::kafka::mock_cluster_with("frames", &records);

        let metrics = Metrics::new().unwrap();
        let line = metrics.line("test");
        let tracker = OffsetTracker::new();
        let health = Arc::new(LineHealth::default());
        let context = SourceContext { tracker: tracker.clone(), metrics: line.clone(), health };
        let consumer: StreamConsumer<SourceContext> =
            crate::service::kafka::consumer_config(&kafka, "group").create_with_context(context).unwrap();
        consumer.subscribe(&["frames"]).unwrap();
        let (to_preprocess, frames) = crossbeam_channel::bounded(3);
        let source = Source {
            line: "test".into(),
            consumer,
            tracker: tracker.clone(),
            permits: Arc::new(Semaphore::new(3)),
            to_preprocess,
            metrics: line,
            commit_interval: Duration::from_millis(100),
        };
        let (stop, stop_rx) = watch::channel(false);
        let (drained_tx, drained) = oneshot::channel();
        let running = tokio::spawn(source.run(stop_rx, drained));

        let paused = || metrics.render().contains("lineguard_consumer_paused{line=\"test\"} 1");
        let wait = |what: &str, done: &dyn Fn() -> bool| {
            let started = Instant::now();
            while !done() {
                assert!(started.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait("three frames and a pause", &|| frames.len() == 3 && paused());
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(frames.len(), 3, "nothing is consumed beyond the in-flight limit");
        assert_eq!(tracker.in_flight(), 3);

        // Finishing two frames lets exactly two more in.
        for frame in frames.try_iter().take(2) {
            frame.ack.delivered();
        }
        wait("two more frames", &|| frames.len() == 3);
        assert_eq!(tracker.in_flight(), 3);

        for frame in frames.try_iter() {
            frame.ack.delivered();
        }
        wait("the next frames", &|| frames.len() == 3);
        // The periodic (asynchronous) commits of the acknowledged frames are counted as they complete.
        // Before, rust-rdkafka's asynchronous commit never reported back and this counter stayed at 0.
        let counted = || {
            metrics
                .render()
                .lines()
                .find_map(|l| l.strip_prefix("lineguard_offset_commits_total{line=\"test\",result=\"ok\"} "))
                .and_then(|count| count.trim().parse::<f64>().ok())
                .is_some_and(|count| count > 0.0)
        };
        wait("a periodic commit to be counted", &counted);
        stop.send(true).unwrap();
        for frame in frames.try_iter() {
            frame.ack.delivered();
        }
        drained_tx.send(Ok(())).unwrap();
        tokio::time::timeout(Duration::from_secs(30), running).await.unwrap().unwrap().unwrap();
        assert_eq!(tracker.in_flight(), 0);
        let page = metrics.render();
        assert!(page.contains("lineguard_offset_commits_total{line=\"test\",result=\"ok\"}"), "{page}");
    }
}
