//! The producer a line publishes through, and publishing a record until the broker acknowledges it.
//!
//! librdkafka's idempotent producer can be left unable to deliver while its broker answers:
//! - a broker that lost its producer state (restarted empty, as nisshi's in-memory engine does) answers
//!   every produce with UNKNOWN_PRODUCER_ID; librdkafka expects a broker to accept the sequence restarted
//!   at 0 under a bumped epoch (KIP-360), so it bumps the epoch and retries, forever (measured in
//!   `tests/pipeline.rs`: not recovered 240 s later, in 4 runs of 4);
//! - or it fails fatally (an out-of-order sequence), after which that client publishes nothing more.
//!
//! Both clear the way librdkafka's documentation prescribes for a fatal error: a fresh client, which asks
//! the broker for a new producer id. [`Publisher`] holds the line's current client and replaces it when
//! records have waited `kafka.producer_stall_secs` without a single delivery, or at once on a fatal
//! error. The records waiting in the old client are purged, and each publish sends its record again
//! through the new one. A record that the old client had delivered without our hearing of it is then
//! published twice: at-least-once, and every output is keyed by frame id.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::util::Timeout;

use crate::service::kafka::{fatal_reason, Permanent, PublishError};
use crate::service::metrics::{LineMetrics, ProducerReplacement};

/// Consecutive fatal errors, each followed by a fresh client, after which a publish gives up: a client
/// that fails fatally from its first record on will not be mended by another, and the line then stops
/// with the cause (the orchestrator restarts the process).
const MAX_FATAL_REPLACEMENTS: u32 = 3;

/// How far repeated stall replacements space out: up to this many times `producer_stall_secs`.
const MAX_PATIENCE_FACTOR: u32 = 8;

/// One line's producer, replaced by a fresh client when it can no longer deliver (see the module doc).
pub struct Publisher {
    config: ClientConfig,
    line: String,
    metrics: LineMetrics,
    state: Mutex<State>,
}

struct State {
    producer: FutureProducer,
    /// Counts replacements, so that the publishes that all saw one client fail replace it once.
    generation: u64,
    watch: StallWatch,
}

impl Publisher {
    /// `stall_after`: how long records may wait without a delivery before the client is replaced
    /// (`None`: only fatal errors replace it).
    pub fn new(
        config: ClientConfig,
        line: &str,
        metrics: LineMetrics,
        stall_after: Option<Duration>,
    ) -> KafkaResult<Publisher> {
        let producer = config.create()?;
        let state = State { producer, generation: 0, watch: StallWatch::new(stall_after, Instant::now()) };
        Ok(Publisher { config, line: line.to_string(), metrics, state: Mutex::new(state) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing that can panic runs under the lock; should it, the state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The client in use and its generation.
    fn current(&self) -> (u64, FutureProducer) {
        let state = self.state();
        (state.generation, state.producer.clone())
    }

    /// Why the client in use failed fatally, given the error a publish saw.
    pub fn fatal_reason(&self, err: &KafkaError) -> Option<String> {
        fatal_reason(self.current().1.client(), err)
    }

    /// Publishes one record, retrying transient errors with backoff until the broker acknowledges it: the
    /// frame's offset must not be committed before, and giving up would lose it. A fatal error of the
    /// client replaces it and the record goes again, up to [`MAX_FATAL_REPLACEMENTS`] times in a row. An
    /// error that retrying cannot clear ([`Permanent`]) returns at once, for the caller to decide (a
    /// smaller record, skipping an optional output, or stopping the line visibly). `on_error` is called
    /// for every failed attempt.
    pub async fn send_until_delivered(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &OwnedHeaders,
        mut on_error: impl FnMut(&KafkaError),
    ) -> Result<(), PublishError> {
        let _waiting = Waiting::start(self);
        let failed = |kind, source| PublishError { topic: topic.into(), key: key.into(), kind, source };
        let mut backoff = Duration::from_millis(100);
        loop {
            let (generation, producer) = self.current();
            let record = FutureRecord::to(topic).key(key).payload(payload).headers(headers.clone());
            let err = match producer.send(record, Timeout::After(Duration::from_secs(5))).await {
                Ok(_) => {
                    self.state().watch.delivered(Instant::now());
                    return Ok(());
                }
                Err((err, _)) => err,
            };
            on_error(&err);
            // Purged by a replacement (which said so in the log): straight to the new client.
            if matches!(err.rdkafka_error_code(), Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight))
                && self.current().0 != generation
            {
                continue;
            }
            // The record's own error may be a transient-looking one while the client behind it is done
            // for: the client's state says so.
            if let Some(reason) = fatal_reason(producer.client(), &err) {
                if !self.replace_after_fatal(generation, &reason) {
                    return Err(failed(Permanent::Fatal, err));
                }
                continue;
            }
            match Permanent::classify(&err) {
                Some(kind) => return Err(failed(kind, err)),
                None => {
                    log::warn!("publishing {key} to {topic} failed ({err}); retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Replaces the client of `generation`, which failed fatally, unless another publish did already.
    /// False when it is time to give up.
    fn replace_after_fatal(&self, generation: u64, reason: &str) -> bool {
        let state = self.state();
        if state.generation != generation {
            return true;
        }
        if state.watch.fatal_in_a_row >= MAX_FATAL_REPLACEMENTS {
            log::error!(
                "line {}: the producer failed fatally ({reason}) {} times in a row, each time a fresh client; \
                 giving up",
                self.line,
                state.watch.fatal_in_a_row + 1
            );
            return false;
        }
        let why = format!("it failed fatally ({reason})");
        self.replace(state, ProducerReplacement::Fatal, &why)
    }

    /// Replaces the client when its records have waited too long (called every second by
    /// [`Publisher::watch_for_stalls`]).
    fn replace_if_stalled(&self, now: Instant) {
        let state = self.state();
        if let Some(waited) = state.watch.stalled(now) {
            let why = format!(
                "{} records have waited {:.0}s without a single delivery (kafka.producer_stall_secs)",
                state.watch.waiting,
                waited.as_secs_f64()
            );
            self.replace(state, ProducerReplacement::Stalled, &why);
        }
    }

    fn replace(&self, mut state: MutexGuard<'_, State>, reason: ProducerReplacement, why: &str) -> bool {
        let fresh: FutureProducer = match self.config.create() {
            Ok(fresh) => fresh,
            Err(err) => {
                log::error!("line {}: the producer should be replaced because {why}, but: {err}", self.line);
                return false;
            }
        };
        let old = std::mem::replace(&mut state.producer, fresh);
        state.generation += 1;
        state.watch.replaced(Instant::now(), reason);
        let generation = state.generation;
        drop(state);
        log::warn!(
            "line {}: replacing the producer with a fresh client (#{generation}) because {why}; its waiting \
             records go again through the new one",
            self.line
        );
        self.metrics.producer_replaced(reason);
        // Purging makes the old client report every waiting record as failed, which sends each publish
        // to the new client. Off the async threads: the purge, and dropping the client if this was its
        // last handle, wait for librdkafka's threads.
        tokio::task::spawn_blocking(move || old.purge(PurgeConfig::default().queue().inflight()));
        true
    }

    /// Checks every second for a stalled client; runs until the task is dropped (with the sink).
    pub async fn watch_for_stalls(&self) {
        if self.state().watch.after.is_none() {
            return;
        }
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.replace_if_stalled(Instant::now());
        }
    }
}

#[cfg(test)]
impl Publisher {
    /// Makes the client in use fail fatally (see `kafka::fail_fatally`).
    pub(crate) fn fail_fatally(&self) {
        crate::service::kafka::fail_fatally(&self.current().1);
    }
}

/// Counts a publish as waiting for as long as it lives (aborted ones included).
struct Waiting<'a>(&'a Publisher);

impl<'a> Waiting<'a> {
    fn start(publisher: &'a Publisher) -> Waiting<'a> {
        publisher.state().watch.started(Instant::now());
        Waiting(publisher)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.state().watch.ended();
    }
}

/// When a client counts as stalled: records have been waiting for `patience` and none was delivered
/// meanwhile. After each replacement the patience doubles, up to [`MAX_PATIENCE_FACTOR`] times
/// `after`, and the first delivery resets it: a broker that is down rather than forgetful is not helped by
/// fresh clients, so they come ever more rarely instead of churning connections.
#[derive(Debug)]
struct StallWatch {
    after: Option<Duration>,
    patience: Duration,
    /// The last delivery, replacement, or start of waiting after a time with nothing to publish.
    progress_at: Instant,
    waiting: usize,
    fatal_in_a_row: u32,
}

impl StallWatch {
    fn new(after: Option<Duration>, now: Instant) -> StallWatch {
        StallWatch { after, patience: after.unwrap_or_default(), progress_at: now, waiting: 0, fatal_in_a_row: 0 }
    }

    fn started(&mut self, now: Instant) {
        // An idle line delivered nothing for a while without being stalled: its wait starts now.
        if self.waiting == 0 {
            self.progress_at = now;
        }
        self.waiting += 1;
    }

    fn ended(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
    }

    fn delivered(&mut self, now: Instant) {
        self.progress_at = now;
        self.patience = self.after.unwrap_or_default();
        self.fatal_in_a_row = 0;
    }

    /// How long records have waited, when that makes the client stalled.
    fn stalled(&self, now: Instant) -> Option<Duration> {
        let waited = now.saturating_duration_since(self.progress_at);
        (self.after.is_some() && self.waiting > 0 && waited >= self.patience).then_some(waited)
    }

    fn replaced(&mut self, now: Instant, reason: ProducerReplacement) {
        self.progress_at = now;
        if let Some(after) = self.after {
            self.patience = (self.patience * 2).min(after * MAX_PATIENCE_FACTOR);
        }
        if reason == ProducerReplacement::Fatal {
            self.fatal_in_a_row += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::metrics::Metrics;

    #[test]
    fn a_client_is_stalled_when_records_wait_without_a_delivery_and_replacements_space_out() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut watch = StallWatch::new(Some(Duration::from_secs(30)), start);
        // Nothing waits: an idle line is never stalled, however long it was since the last delivery.
        assert_eq!(watch.stalled(at(1000)), None);
        // Waiting starts at the first record after the idle time, not at the last delivery.
        watch.started(at(1000));
        assert_eq!(watch.stalled(at(1029)), None);
        assert_eq!(watch.stalled(at(1030)), Some(Duration::from_secs(30)));
        // Deliveries while records keep coming: progress.
        watch.started(at(1031));
        watch.delivered(at(1031));
        assert_eq!(watch.stalled(at(1060)), None);
        // Replacements without a delivery: 30, then 60, 120, 240 s, and no longer than that.
        let mut now = 1061;
        for patience in [60, 120, 240, 240, 240] {
            watch.replaced(at(now), ProducerReplacement::Stalled);
            assert_eq!(watch.stalled(at(now + patience - 1)), None, "patience {patience}");
            assert!(watch.stalled(at(now + patience)).is_some(), "patience {patience}");
            now += patience;
        }
        // A delivery resets the patience; when nothing waits any more nothing is stalled.
        watch.delivered(at(now));
        assert!(watch.stalled(at(now + 30)).is_some());
        watch.ended();
        watch.ended();
        watch.ended();
        assert_eq!(watch.waiting, 0, "never below zero");
        assert_eq!(watch.stalled(at(now + 3600)), None);
        // Without a stall time only fatal errors replace a client.
        let mut never = StallWatch::new(None, start);
        never.started(start);
        assert_eq!(never.stalled(at(1_000_000)), None);
    }

    #[test]
    fn fatal_replacements_in_a_row_are_counted_until_a_delivery() {
        let start = Instant::now();
        let mut watch = StallWatch::new(Some(Duration::from_secs(30)), start);
        for _ in 0..MAX_FATAL_REPLACEMENTS {
            watch.replaced(start, ProducerReplacement::Fatal);
        }
        watch.replaced(start, ProducerReplacement::Stalled);
        assert_eq!(watch.fatal_in_a_row, MAX_FATAL_REPLACEMENTS, "stall replacements do not count");
        watch.delivered(start);
        assert_eq!(watch.fatal_in_a_row, 0);
    }

    fn publisher(kafka: &crate::service::settings::KafkaSettings) -> (Publisher, std::sync::Arc<Metrics>) {
        let metrics = Metrics::new().unwrap();
        let config = crate::service::kafka::producer_config(kafka);
        (Publisher::new(config, "l", metrics.line("l"), Some(Duration::from_secs(30))).unwrap(), metrics)
    }

    fn replacements(metrics: &Metrics, reason: &str) -> String {
        let series =
            format!("lineguard_producer_replacements_total{{client=\"outputs\",line=\"l\",reason=\"{reason}\"}} ");
        let page = metrics.render();
        page.lines().find_map(|line| line.strip_prefix(&series)).unwrap_or("missing").to_string()
    }

    /// A real client in the state of an idempotent producer whose sequence the broker refused: the record
    /// still reaches the broker, through a fresh client.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_failed_fatally_is_replaced_and_the_record_goes_through_the_new_one() {
        let (_cluster, kafka) = crate::service::kafka::mock_cluster_with("out", &[]);
        let (publisher, metrics) = publisher(&kafka);
        let failed_client = publisher.current().1;
        publisher.fail_fatally();
        let mut errors = 0;
        let headers = OwnedHeaders::new();
        let sent = publisher.send_until_delivered("out", "k", b"bytes", &headers, |_| errors += 1);
        tokio::time::timeout(Duration::from_secs(60), sent).await.expect("delivered in time").unwrap();
        assert_eq!(errors, 1, "one failed attempt, on the failed client");
        assert_eq!(publisher.current().0, 1, "one replacement");
        assert!(
            failed_client.client().fatal_error().is_some() && publisher.current().1.client().fatal_error().is_none()
        );
        assert_eq!(replacements(&metrics, "fatal"), "1");
        assert_eq!(replacements(&metrics, "stalled"), "0");
        assert_eq!(publisher.state().watch.fatal_in_a_row, 0, "the delivery resets the count");
        assert_eq!(publisher.state().watch.waiting, 0);
    }

    /// A client that fails fatally again and again is not replaced for ever: the publish gives up with the
    /// fatal error, for the sink to stop the line.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_publish_gives_up_after_the_fresh_clients_failed_fatally_in_a_row() {
        let (_cluster, kafka) = crate::service::kafka::mock_cluster_with("out", &[]);
        let (publisher, metrics) = publisher(&kafka);
        publisher.state().watch.fatal_in_a_row = MAX_FATAL_REPLACEMENTS;
        publisher.fail_fatally();
        let headers = OwnedHeaders::new();
        let sent = publisher.send_until_delivered("out", "k", b"bytes", &headers, |_| {});
        let err = tokio::time::timeout(Duration::from_secs(60), sent).await.expect("ends in time").unwrap_err();
        assert_eq!(err.kind, Permanent::Fatal);
        assert!(publisher.fatal_reason(&err.source).is_some_and(|r| r.contains("injected by the test")));
        assert_eq!(publisher.current().0, 0, "not replaced");
        assert_eq!(replacements(&metrics, "fatal"), "0");
    }
}
