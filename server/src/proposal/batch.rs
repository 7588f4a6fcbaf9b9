//! Proposal batching on the leader: client commands → one [`Proposal`] per log entry.
//!
//! At most `in_flight` entries of client commands are appended and not yet applied at a time.
//! While they are in flight, new commands queue here; the next entry takes all of them (up to
//! the batch limits). A lone command never waits: with nothing in flight and nothing queued
//! its caller hands it to Raft itself ([`Gate::direct_slot`]), so batching adds no latency
//! when idle and amortizes the per-entry cost (Raft bookkeeping, log append, fsync, replication
//! message, apply call) when busy, as etcd and ZooKeeper do. Queued commands are handed to Raft
//! in arrival order by one task. Concurrent calls have no order to keep (each came on its own
//! stream). One exception to "never waits": commands that keep arriving in pairs at an idle
//! leader are put in one entry ([`Pairing`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::ClientWriteError;
use openraft::raft::ClientWriteResult;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{now_ms, ForwardReply, ProposeError};
use crate::raft::{NodeId, Raft, TypeConfig};
use crate::state::{Command, Proposal};

/// Batch limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most commands in one entry.
    pub max_commands: usize,
    /// A batch stops growing once its commands take this many bytes (roughly).
    pub max_bytes: usize,
    /// Entries of client commands appended and not yet applied, at most.
    pub in_flight: usize,
}

struct Pending {
    cmd: Command,
    reply: oneshot::Sender<Delivery>,
}

/// What a caller of [`Batcher::propose`] receives: its result, or, as the first command of an
/// entry, the entry to finish.
enum Delivery {
    Done(ForwardReply),
    Finish(EntryFinisher),
}

/// One entry in flight: Raft's answer and the other callers waiting on it. The entry's first
/// caller awaits Raft's answer itself and hands out the others' results, so that the answer
/// wakes a caller directly rather than a task in between (one wake-up less per write).
/// Dropped unfinished — that caller gave up — it finishes on a task of its own.
struct EntryFinisher {
    parts: Option<EntryParts>,
}

struct EntryParts {
    id: NodeId,
    /// Raft's answer (openraft's default responder is a tokio oneshot channel).
    applied: oneshot::Receiver<ClientWriteResult<TypeConfig>>,
    others: Vec<oneshot::Sender<Delivery>>,
    /// The entry's in-flight slot, freed when Raft answers.
    permit: OwnedSemaphorePermit,
    proposed: Instant,
    commit_time: CommitTime,
}

impl EntryFinisher {
    async fn finish(mut self) -> ForwardReply {
        let parts = self.parts.as_mut().expect("an unfinished entry");
        let result = (&mut parts.applied).await;
        let parts = self.parts.take().expect("an unfinished entry");
        parts.deliver(result)
    }
}

impl Drop for EntryFinisher {
    fn drop(&mut self) {
        let Some(mut parts) = self.parts.take() else {
            return;
        };
        // Without a runtime (it is shutting down) nobody is left to answer.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let result = (&mut parts.applied).await;
                // The first caller's own result has nobody left to take it.
                let _ = parts.deliver(result);
            });
        }
    }
}

impl EntryParts {
    /// Hands the other callers their results and returns the first caller's.
    fn deliver(
        self,
        result: Result<ClientWriteResult<TypeConfig>, oneshot::error::RecvError>,
    ) -> ForwardReply {
        let EntryParts {
            id,
            others,
            permit,
            proposed,
            commit_time,
            ..
        } = self;
        drop(permit);
        commit_time.record(proposed.elapsed());
        let outputs = match result {
            Ok(Ok(response)) => response.data,
            Ok(Err(e)) => return Err(fail_others(others, write_error(id, e))),
            Err(_) => {
                let e = ProposeError::Stopped("raft dropped the proposal".into());
                return Err(fail_others(others, e));
            }
        };
        if outputs.len() != others.len() + 1 {
            // Apply returns one output per command; anything else is a bug.
            let e = ProposeError::Stopped(format!(
                "apply returned {} outputs for {} commands",
                outputs.len(),
                others.len() + 1
            ));
            return Err(fail_others(others, e));
        }
        let mut outputs = outputs.into_iter();
        let own = outputs.next().expect("one output per command");
        for (reply, out) in others.into_iter().zip(outputs) {
            let _ = reply.send(Delivery::Done(Ok(out)));
        }
        Ok(own)
    }
}

/// Fails the other callers with `e` and returns it for the first.
fn fail_others(others: Vec<oneshot::Sender<Delivery>>, e: ProposeError) -> ProposeError {
    fail_all(others, e.clone());
    e
}

/// Queues commands for the batching task, or hands a command to Raft itself when the leader is
/// idle.
#[derive(Clone)]
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Pending>,
    shared: Arc<Shared>,
}

/// What the batching task and callers taking the direct path share.
struct Shared {
    id: NodeId,
    raft: Raft,
    gate: Gate,
}

/// Decides which commands may skip the batching task.
struct Gate {
    /// Entries in flight, at most (`Batching::in_flight`).
    slots: usize,
    in_flight: Arc<Semaphore>,
    /// Commands queued or being formed into an entry: not yet handed to Raft.
    unproposed: AtomicUsize,
    pairing: std::sync::Mutex<Pairing>,
    commit_time: CommitTime,
}

impl Batcher {
    /// Starts the batching task; it ends when every `Batcher` clone is gone.
    pub(super) fn start(id: NodeId, raft: Raft, limits: Batching) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let slots = limits.in_flight.max(1);
        let shared = Arc::new(Shared {
            id,
            raft,
            gate: Gate::new(slots),
        });
        tokio::spawn(run(shared.clone(), limits, rx));
        Batcher { queue, shared }
    }

    /// Proposes `cmd` in the next batch and waits for its apply result.
    pub(super) async fn propose(&self, cmd: Command) -> ForwardReply {
        if let Some(permit) = self.shared.gate.direct_slot() {
            let entry = self
                .shared
                .hand_to_raft(vec![cmd], permit, Vec::new())
                .await?;
            return entry.finish().await;
        }
        self.shared.gate.unproposed.fetch_add(1, Ordering::SeqCst);
        let (reply, rx) = oneshot::channel();
        if self.queue.send(Pending { cmd, reply }).is_err() {
            self.shared.gate.unproposed.fetch_sub(1, Ordering::SeqCst);
            return Err(ProposeError::Stopped("the proposal queue is closed".into()));
        }
        match rx.await {
            Ok(Delivery::Done(reply)) => reply,
            Ok(Delivery::Finish(entry)) => entry.finish().await,
            Err(_) => Err(ProposeError::Stopped("the proposal was dropped".into())),
        }
    }
}

impl Gate {
    fn new(slots: usize) -> Self {
        Gate {
            slots,
            in_flight: Arc::new(Semaphore::new(slots)),
            unproposed: AtomicUsize::new(0),
            pairing: std::sync::Mutex::new(Pairing::default()),
            commit_time: CommitTime::default(),
        }
    }

    fn pairing(&self) -> std::sync::MutexGuard<'_, Pairing> {
        // Pairing only tunes batching; its state is valid whatever a panic interrupted.
        self.pairing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn idle(&self) -> bool {
        self.in_flight.available_permits() == self.slots
    }

    /// An in-flight slot for a command that goes to Raft directly, without the batching task:
    /// when no entry is in flight, no command waits to be proposed, and pairing holds nothing
    /// back. Batching has nothing to add then, and the task would only cost two wake-ups on the
    /// write's path (the task's, and the caller's for the entry to finish). Measured on one
    /// member, 1 client: 5.1 context switches per write instead of 6.1, and about 30 µs less
    /// server CPU per write (BENCHMARKS.md).
    fn direct_slot(&self) -> Option<OwnedSemaphorePermit> {
        if self.unproposed.load(Ordering::SeqCst) != 0 || !self.idle() {
            return None;
        }
        let mut pairing = self.pairing();
        if pairing.wait {
            return None;
        }
        let permit = self.in_flight.clone().try_acquire_owned().ok()?;
        let now = Instant::now();
        // Not waiting, so the command goes at once (perhaps as a near miss, which makes the
        // next pair wait, through the task).
        let waits = pairing.on_first(now, true, self.commit_time.pair_window());
        debug_assert!(!waits, "pairing waits only when it said so before");
        pairing.on_proposed(now, 1, false);
        Some(permit)
    }
}

impl Shared {
    /// Hands one entry of `commands` to Raft. Returns the entry for its first command's caller
    /// to finish; `others` are the other commands' callers, which it fails if Raft has stopped.
    async fn hand_to_raft(
        &self,
        mut commands: Vec<Command>,
        permit: OwnedSemaphorePermit,
        others: Vec<oneshot::Sender<Delivery>>,
    ) -> Result<EntryFinisher, ProposeError> {
        // The leader's clock, stamped once per entry, so apply never reads one.
        let time_ms = now_ms();
        for cmd in &mut commands {
            cmd.time_ms = time_ms;
        }
        let applied = match self.raft.client_write_ff(Proposal { commands }).await {
            Ok(applied) => applied,
            Err(fatal) => {
                return Err(fail_others(
                    others,
                    ProposeError::Stopped(fatal.to_string()),
                ))
            }
        };
        Ok(EntryFinisher {
            parts: Some(EntryParts {
                id: self.id,
                applied,
                others,
                permit,
                proposed: Instant::now(),
                commit_time: self.gate.commit_time.clone(),
            }),
        })
    }
}

/// Bounds of the pairing window (see [`CommitTime`]).
const MIN_PAIR_WAIT: Duration = Duration::from_micros(50);
const MAX_PAIR_WAIT: Duration = Duration::from_micros(300);

/// A moving average of how long an entry takes from proposal to Raft's answer: one fsync on a
/// single member, a replication round trip and two fsyncs on three. It sets how long an idle
/// batcher waits for the second command of a pair (see [`Pairing`]): a third of a commit, which
/// is what a pair split over two entries costs the second command. A lone client's next
/// command comes at least a whole commit after its last, so it never looks like a near miss.
/// Measured: three members, 8 clients on one lock, 1,123-1,202 hand-offs/s with a fixed 60 µs
/// window against 1,391-1,400 with 200 µs (1.8 and 1.2 entries per hand-off).
#[derive(Clone, Default)]
struct CommitTime {
    micros: Arc<AtomicU64>,
}

impl CommitTime {
    fn record(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let old = self.micros.load(Ordering::Relaxed);
        // Updated by whichever caller finishes an entry; a lost update only slows the average.
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.micros.store(new, Ordering::Relaxed);
    }

    fn pair_window(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::Relaxed) / 3)
            .clamp(MIN_PAIR_WAIT, MAX_PAIR_WAIT)
    }
}

/// Notices commands that arrive in pairs at an idle leader — the next lock holder's unlock
/// and the last holder's new claim, both sent on the same applied release — which would
/// otherwise go in two entries, one fsync (and replication round) after the other. After one
/// such near miss, an idle batcher holds its first command up to the pairing window (a third
/// of a recent commit, [`CommitTime`]) for a partner,
/// and stops as soon as none comes or entries fill up on their own. A lone client never
/// arrives within that window of its own previous entry (a write's round trip includes an
/// fsync), so it never waits.
#[derive(Debug, Default)]
struct Pairing {
    /// When the last entry of a single command was proposed.
    single_proposed: Option<Instant>,
    /// Whether an idle batcher waits for a partner.
    wait: bool,
}

impl Pairing {
    /// Called with the command that starts an entry; returns whether to wait for a partner.
    /// `window`: how close behind a lone command another counts as its partner.
    fn on_first(&mut self, now: Instant, idle: bool, window: Duration) -> bool {
        let near_miss = self
            .single_proposed
            .take()
            .is_some_and(|t| now.duration_since(t) < window);
        if near_miss {
            // This command is the partner that just missed its entry: it goes at once, and
            // the next pair waits.
            self.wait = true;
            return false;
        }
        self.wait && idle
    }

    fn on_proposed(&mut self, now: Instant, commands: usize, waited_in_vain: bool) {
        // Under load entries fill up while others are in flight: no need to wait.
        if waited_in_vain || commands > 2 {
            self.wait = false;
        }
        self.single_proposed = (commands == 1).then_some(now);
    }
}

/// Yields until a command is queued or `until` passes (tokio's timers tick in milliseconds,
/// far coarser than the wait). Returns whether one came.
async fn wait_for_partner(rx: &mpsc::UnboundedReceiver<Pending>, until: Instant) -> bool {
    loop {
        if !rx.is_empty() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::task::yield_now().await;
    }
}

async fn run(shared: Arc<Shared>, limits: Batching, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let gate = &shared.gate;
    while let Some(first) = rx.recv().await {
        let idle = gate.idle();
        let mut waited_in_vain = false;
        let window = gate.commit_time.pair_window();
        if gate.pairing().on_first(Instant::now(), idle, window) {
            waited_in_vain = !wait_for_partner(&rx, Instant::now() + window).await;
        }
        // Waiting here is what forms batches: commands arriving meanwhile join this one.
        let Ok(permit) = gate.in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.cmd.approx_size();
        let mut batch = vec![first];
        while batch.len() < limits.max_commands && bytes < limits.max_bytes {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.cmd.approx_size();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let count = batch.len();
        let (commands, replies): (Vec<Command>, Vec<_>) =
            batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
        gate.pairing()
            .on_proposed(Instant::now(), count, waited_in_vain);
        let mut replies = replies.into_iter();
        let first = replies.next().expect("a batch has a command");
        let entry = shared
            .hand_to_raft(commands, permit, replies.collect())
            .await;
        // Handed to Raft (or failed): the direct path may go again once the entry is answered.
        gate.unproposed.fetch_sub(count, Ordering::SeqCst);
        match entry {
            // A first caller that is gone drops the entry unfinished: it finishes on a task.
            Ok(entry) => {
                let _ = first.send(Delivery::Finish(entry));
            }
            Err(e) => {
                let _ = first.send(Delivery::Done(Err(e)));
                return;
            }
        }
    }
}

fn write_error(id: NodeId, e: ClientWriteError<NodeId, crate::raft::KordNode>) -> ProposeError {
    match e {
        ClientWriteError::ForwardToLeader(f) => ProposeError::NotLeader {
            member: id,
            leader: f.leader_id,
        },
        ClientWriteError::ChangeMembershipError(e) => ProposeError::Stopped(e.to_string()),
    }
}

fn fail_all(replies: Vec<oneshot::Sender<Delivery>>, e: ProposeError) {
    for reply in replies {
        let _ = reply.send(Delivery::Done(Err(e.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ApplyError, ApplyOutput};
    use openraft::raft::ClientWriteResponse;
    use openraft::{CommittedLeaderId, LogId};

    fn output(revision: u64) -> ApplyOutput {
        ApplyOutput {
            revision,
            reply: Err(ApplyError::NoNode {
                path: format!("/n{revision}"),
            }),
        }
    }

    /// An entry of `callers` commands whose Raft answer is sent through the returned sender.
    #[allow(clippy::type_complexity)]
    fn make_entry(
        callers: usize,
    ) -> (
        EntryFinisher,
        Vec<oneshot::Receiver<Delivery>>,
        oneshot::Sender<ClientWriteResult<TypeConfig>>,
        Arc<Semaphore>,
    ) {
        let slots = Arc::new(Semaphore::new(1));
        let permit = slots.clone().try_acquire_owned().unwrap();
        let (answer, applied) = oneshot::channel();
        let (others, receivers): (Vec<_>, Vec<_>) =
            (1..callers).map(|_| oneshot::channel()).unzip();
        let entry = EntryFinisher {
            parts: Some(EntryParts {
                id: 1,
                applied,
                others,
                permit,
                proposed: Instant::now(),
                commit_time: CommitTime::default(),
            }),
        };
        (entry, receivers, answer, slots)
    }

    fn applied(outputs: Vec<ApplyOutput>) -> ClientWriteResult<TypeConfig> {
        Ok(ClientWriteResponse {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 7),
            data: outputs,
            membership: None,
        })
    }

    fn done(mut rx: oneshot::Receiver<Delivery>) -> ForwardReply {
        match rx.try_recv().expect("a delivery") {
            Delivery::Done(reply) => reply,
            Delivery::Finish(_) => panic!("only the first caller finishes an entry"),
        }
    }

    #[tokio::test]
    async fn the_first_caller_finishes_the_entry_for_everyone() {
        let (entry, others, answer, slots) = make_entry(3);
        let finishing = tokio::spawn(entry.finish());
        assert_eq!(slots.available_permits(), 0, "in flight until answered");
        answer
            .send(applied(vec![output(5), output(6), output(7)]))
            .unwrap();
        assert_eq!(finishing.await.unwrap().unwrap().revision, 5);
        let revisions: Vec<u64> = others
            .into_iter()
            .map(|rx| done(rx).unwrap().revision)
            .collect();
        assert_eq!(revisions, vec![6, 7]);
        assert_eq!(slots.available_permits(), 1);
    }

    #[tokio::test]
    async fn an_entry_whose_first_caller_gave_up_still_answers_the_others() {
        let (entry, mut others, answer, slots) = make_entry(2);
        let finishing = tokio::spawn(entry.finish());
        finishing.abort();
        assert!(finishing.await.unwrap_err().is_cancelled());
        answer.send(applied(vec![output(5), output(6)])).unwrap();
        let rx = others.pop().unwrap();
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(Delivery::Done(Ok(out)))) => assert_eq!(out.revision, 6),
            _ => panic!("the other caller was not answered"),
        }
        tokio::time::timeout(Duration::from_secs(5), slots.acquire())
            .await
            .expect("the in-flight slot is freed")
            .unwrap()
            .forget();
    }

    #[tokio::test]
    async fn a_wrong_output_count_or_a_dropped_answer_fails_every_caller() {
        let (entry, others, answer, _) = make_entry(2);
        answer.send(applied(vec![output(5)])).unwrap();
        assert!(matches!(
            entry.finish().await,
            Err(ProposeError::Stopped(_))
        ));
        for rx in others {
            assert!(matches!(done(rx), Err(ProposeError::Stopped(_))));
        }
        let (entry, others, answer, _) = make_entry(2);
        drop(answer);
        assert!(matches!(
            entry.finish().await,
            Err(ProposeError::Stopped(_))
        ));
        for rx in others {
            assert!(matches!(done(rx), Err(ProposeError::Stopped(_))));
        }
    }

    #[test]
    fn only_a_command_at_an_idle_leader_with_nothing_queued_skips_the_task() {
        let gate = Gate::new(1);
        let held = gate.direct_slot().expect("idle: goes directly");
        assert!(gate.direct_slot().is_none(), "an entry is in flight");
        drop(held);
        gate.unproposed.fetch_add(1, Ordering::SeqCst);
        assert!(gate.direct_slot().is_none(), "a command is queued");
        gate.unproposed.fetch_sub(1, Ordering::SeqCst);
        gate.pairing().wait = true;
        assert!(gate.direct_slot().is_none(), "pairing holds commands back");
        gate.pairing().wait = false;
        assert!(gate.direct_slot().is_some());
    }

    #[test]
    fn a_near_miss_on_the_direct_path_sends_the_next_pair_through_the_task() {
        let gate = Gate::new(1);
        gate.commit_time.record(Duration::from_secs(1)); // the widest window
        drop(gate.direct_slot().expect("the first goes directly"));
        // Its partner, right behind it, goes at once too, as a near miss...
        drop(gate.direct_slot().expect("a near miss goes at once"));
        // ...and from then on pairs wait for each other in the task.
        assert!(gate.pairing().wait);
        assert!(gate.direct_slot().is_none());
    }

    const US: Duration = Duration::from_micros(1);

    /// The pairing window of a single member in these tests.
    const W: Duration = Duration::from_micros(60);

    #[test]
    fn a_near_miss_makes_the_next_pair_share_an_entry() {
        let t0 = Instant::now();
        let mut p = Pairing::default();
        // A claim goes alone; the unlock arrives 20 µs later: a near miss, which goes at once.
        assert!(!p.on_first(t0, true, W));
        p.on_proposed(t0, 1, false);
        assert!(!p.on_first(t0 + 20 * US, false, W));
        p.on_proposed(t0 + 20 * US, 1, false);
        // The next pair waits, when idle, and keeps waiting while partners come.
        let t1 = t0 + 1000 * US;
        assert!(p.on_first(t1, true, W));
        p.on_proposed(t1 + 15 * US, 2, false);
        assert!(p.on_first(t1 + 900 * US, true, W));
        // A busy batcher forms batches anyway: no waiting there.
        assert!(!p.on_first(t1 + 950 * US, false, W));
    }

    #[test]
    fn waiting_stops_when_no_partner_comes_or_entries_fill_up() {
        let t0 = Instant::now();
        let mut p = Pairing {
            single_proposed: None,
            wait: true,
        };
        assert!(p.on_first(t0, true, W));
        p.on_proposed(t0 + W, 1, true);
        assert!(!p.on_first(t0 + W * 10, true, W), "waited in vain");

        let mut p = Pairing {
            single_proposed: None,
            wait: true,
        };
        p.on_proposed(t0, 40, false);
        assert!(
            !p.on_first(t0 + W * 10, true, W),
            "entries fill up on their own"
        );
    }

    #[test]
    fn a_lone_client_never_waits() {
        // One write at a time: the next arrives at least a commit later, and the window is a
        // third of a commit.
        for commit in [250 * US, 650 * US, 5000 * US] {
            let times = CommitTime::default();
            let mut p = Pairing::default();
            let mut t = Instant::now();
            for _ in 0..100 {
                times.record(commit);
                assert!(!p.on_first(t, true, times.pair_window()));
                p.on_proposed(t, 1, false);
                t += commit;
            }
        }
    }

    #[test]
    fn the_pairing_window_is_a_third_of_a_commit_within_bounds() {
        let times = CommitTime::default();
        assert_eq!(times.pair_window(), MIN_PAIR_WAIT, "before any commit");
        times.record(600 * US);
        assert_eq!(times.pair_window(), 200 * US);
        for _ in 0..100 {
            times.record(240 * US);
        }
        let w = times.pair_window();
        assert!(
            w >= 80 * US && w <= 90 * US,
            "{w:?} after commits of 240 µs"
        );
        times.record(Duration::from_secs(1));
        assert_eq!(times.pair_window(), MAX_PAIR_WAIT);
    }
}
