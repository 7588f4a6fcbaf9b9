//! One watch stream's task: it creates and cancels the stream's watches and delivers each live
//! revision to all of them in one pass, so a revision costs a stream one wake-up however many
//! of its watches it reaches. Watches that must first read the stored history do so in a
//! `catch_up` task, which hands them back once it has delivered everything published.

use std::collections::HashMap;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use super::hub::RevisionEvents;
use super::{
    cancel, catch_up, read_history, slow_consumer, Delivery, Ended, Handback, Outbox, Sent,
    WatchContext, WatchSpec,
};

/// A client's request on the stream, validated by the edge.
pub enum Command {
    /// `spec.id` 0 asks the stream to choose the id. A spec the edge refused comes with the
    /// requested id and the reason.
    Create(Result<WatchSpec, (i64, String)>),
    Cancel(i64),
    /// Progress notifications for every live watch of the stream.
    Progress,
}

/// A watch that receives revisions from the stream's task.
struct Live {
    spec: WatchSpec,
    /// The next revision it is owed.
    next: u64,
    /// Nothing delivered since the last idle tick.
    quiet: bool,
}

/// A watch reading the history in its own task.
struct CatchingUp {
    generation: u64,
    task: JoinHandle<()>,
}

struct Watches<O: Outbox> {
    ctx: Arc<WatchContext>,
    out: Arc<O>,
    live: HashMap<i64, Live>,
    catching_up: HashMap<i64, CatchingUp>,
    handback: mpsc::UnboundedSender<Handback>,
    next_id: i64,
    generation: u64,
    /// Every revision up to this one has been received from the hub (or was published before
    /// the stream subscribed).
    seen: u64,
}

/// Serves one stream until its client closes it (or the hub goes away).
pub async fn serve<O: Outbox>(
    ctx: Arc<WatchContext>,
    out: Arc<O>,
    mut commands: impl Stream<Item = Command> + Unpin,
) {
    let mut hub = ctx.hub.subscribe();
    let (handback, mut handbacks) = mpsc::unbounded_channel();
    let mut idle = tokio::time::interval(ctx.progress_interval);
    idle.reset();
    let mut w = Watches {
        seen: ctx.hub.published(),
        ctx,
        out,
        live: HashMap::new(),
        catching_up: HashMap::new(),
        handback,
        next_id: 1,
        generation: 0,
    };
    loop {
        tokio::select! {
            command = commands.next() => match command {
                Some(c) => w.command(c, &mut hub).await,
                None => break,
            },
            received = hub.recv() => match received {
                Ok(rev) => w.revision(&rev).await,
                Err(RecvError::Lagged(_)) => w.lagged(),
                Err(RecvError::Closed) => break,
            },
            Some(h) = handbacks.recv() => w.handback(h).await,
            _ = idle.tick() => {
                w.drain(&mut hub).await;
                w.idle_progress().await;
            }
        }
    }
    w.end();
}

impl<O: Outbox> Watches<O> {
    async fn command(
        &mut self,
        command: Command,
        hub: &mut broadcast::Receiver<Arc<RevisionEvents>>,
    ) {
        match command {
            Command::Create(spec) => self.create(spec).await,
            Command::Cancel(id) => self.cancel(id).await,
            Command::Progress => {
                self.drain(hub).await;
                let ids: Vec<i64> = self.live.keys().copied().collect();
                for id in ids {
                    self.progress(id).await;
                }
            }
        }
    }

    async fn create(&mut self, spec: Result<WatchSpec, (i64, String)>) {
        let requested = match &spec {
            Ok(s) => s.id,
            Err((id, _)) => *id,
        };
        let id = if requested != 0 {
            requested
        } else {
            self.next_id
        };
        self.next_id = self.next_id.max(id.saturating_add(1));
        let refused = |reason: String| Delivery::Canceled {
            reason,
            compact_revision: 0,
        };
        if self.live.contains_key(&id) || self.catching_up.contains_key(&id) {
            let reason = format!("watch_id {id} is already in use on this stream");
            self.out.deliver(id, refused(reason)).await;
            return;
        }
        let mut spec = match spec {
            Ok(spec) => spec,
            Err((_, reason)) => {
                self.out.deliver(id, refused(reason)).await;
                return;
            }
        };
        spec.id = id;
        let published = self.ctx.hub.published();
        let start = spec.start_revision;
        let next = if start == 0 { published + 1 } else { start };
        if let Sent::Blocked = self
            .out
            .try_deliver(id, Delivery::Created { revision: next - 1 })
            .await
        {
            return;
        }
        self.ctx.running.inc();
        if next > published {
            // Nothing published is owed: every revision it needs is still to come from the hub.
            self.live.insert(
                id,
                Live {
                    spec,
                    next,
                    quiet: true,
                },
            );
        } else {
            self.start_catch_up(spec, next);
        }
    }

    fn start_catch_up(&mut self, spec: WatchSpec, next: u64) {
        self.generation += 1;
        let id = spec.id;
        let task = tokio::spawn(catch_up(
            spec,
            self.generation,
            next,
            self.ctx.clone(),
            self.out.clone(),
            self.handback.clone(),
        ));
        self.catching_up.insert(
            id,
            CatchingUp {
                generation: self.generation,
                task,
            },
        );
    }

    async fn cancel(&mut self, id: i64) {
        let known = if self.live.remove(&id).is_some() {
            true
        } else if let Some(c) = self.catching_up.remove(&id) {
            c.task.abort();
            true
        } else {
            false
        };
        if known {
            self.ctx.running.dec();
            cancel(self.out.as_ref(), id, "canceled by the client".into(), 0).await;
        }
    }

    /// A catch-up ended. Revisions the stream received while it ran are read again from
    /// storage (briefly, in this task) before the watch goes live.
    async fn handback(&mut self, h: Handback) {
        match self.catching_up.get(&h.id) {
            Some(c) if c.generation == h.generation => {
                self.catching_up.remove(&h.id);
            }
            // Canceled meanwhile (and perhaps its id reused): not ours to count.
            _ => return,
        }
        let Some(mut next) = h.next else {
            self.ctx.running.dec();
            return;
        };
        if next <= self.seen {
            match read_history(&h.spec, &mut next, &self.ctx, self.out.as_ref()).await {
                Ended::CaughtUp { next: n } => next = n,
                Ended::Done => {
                    self.ctx.running.dec();
                    return;
                }
            }
        }
        self.live.insert(
            h.id,
            Live {
                spec: h.spec,
                next,
                quiet: false,
            },
        );
    }

    /// Delivers one revision to every live watch it reaches. Once the stream's buffer has
    /// stayed full for the grace period, the other watches the revision reaches are canceled
    /// without waiting again: the consumer is not reading.
    async fn revision(&mut self, rev: &Arc<RevisionEvents>) {
        self.seen = self.seen.max(rev.revision);
        let mut blocked = false;
        let mut ended = Vec::new();
        for (id, w) in self.live.iter_mut() {
            if rev.revision < w.next {
                continue;
            }
            w.next = rev.revision + 1;
            let Some(selected) = w.spec.select(rev) else {
                continue;
            };
            w.quiet = false;
            let sent = if blocked {
                Sent::Blocked
            } else {
                self.out.try_deliver(*id, Delivery::Events(selected)).await
            };
            match sent {
                Sent::Ok if w.spec.one_shot => ended.push(*id),
                Sent::Ok => {}
                Sent::Blocked => {
                    blocked = true;
                    cancel(self.out.as_ref(), *id, slow_consumer(rev.revision), 0).await;
                    ended.push(*id);
                }
            }
        }
        for id in ended {
            self.live.remove(&id);
            self.ctx.running.dec();
        }
    }

    /// The hub's buffer left this stream behind: every live watch reads the missed revisions
    /// from storage.
    fn lagged(&mut self) {
        let live: Vec<Live> = self.live.drain().map(|(_, w)| w).collect();
        for w in live {
            self.start_catch_up(w.spec, w.next);
        }
    }

    /// Delivers every revision the hub has already sent, so that a progress notification
    /// that follows covers them.
    async fn drain(&mut self, hub: &mut broadcast::Receiver<Arc<RevisionEvents>>) {
        loop {
            match hub.try_recv() {
                Ok(rev) => self.revision(&rev).await,
                Err(TryRecvError::Lagged(_)) => self.lagged(),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }

    /// Tells a live watch that every revision up to the last one received was delivered.
    async fn progress(&mut self, id: i64) {
        let Some(w) = self.live.get_mut(&id) else {
            return;
        };
        let revision = self.seen.max(w.next - 1);
        w.next = revision + 1;
        if let Sent::Blocked = self
            .out
            .try_deliver(id, Delivery::Progress { revision })
            .await
        {
            self.live.remove(&id);
            self.ctx.running.dec();
            let reason = "slow consumer: the stream's buffer is full".to_owned();
            cancel(self.out.as_ref(), id, reason, 0).await;
        }
    }

    /// Progress for the live watches that got nothing since the last tick.
    async fn idle_progress(&mut self) {
        let quiet: Vec<i64> = self
            .live
            .iter()
            .filter(|(_, w)| w.quiet)
            .map(|(id, _)| *id)
            .collect();
        for id in quiet {
            self.progress(id).await;
        }
        for w in self.live.values_mut() {
            w.quiet = true;
        }
    }

    fn end(self) {
        for c in self.catching_up.values() {
            c.task.abort();
        }
        let watches = self.live.len() + self.catching_up.len();
        self.ctx.running.dec_by(watches as i64);
    }
}

#[cfg(test)]
mod tests {
    //! The stream task against a real hub and a real RocksDB event history. The runtime is
    //! single-threaded, so the test decides when the stream task runs: publishing without
    //! yielding overruns the hub's buffer for certain.

    use super::*;
    use crate::state::{Event, EventKind, Stat};
    use crate::storage::{cf, codec, open_db};
    use crate::watch::hub::{WatchHub, LIVE_BUFFER_REVISIONS};
    use crate::watch::Scope;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    /// Collects deliveries; never full, but yields on each as a real stream's channel may.
    struct Collect(mpsc::UnboundedSender<(i64, Delivery)>);

    impl Outbox for Collect {
        async fn try_deliver(&self, watch_id: i64, d: Delivery) -> Sent {
            tokio::task::yield_now().await;
            match self.0.send((watch_id, d)) {
                Ok(()) => Sent::Ok,
                Err(_) => Sent::Blocked,
            }
        }
        async fn deliver(&self, watch_id: i64, d: Delivery) {
            let _ = self.0.send((watch_id, d));
        }
    }

    fn store_and_publish(db: &rocksdb::DB, hub: &WatchHub, revision: u64, path: &str) {
        let events = vec![Event {
            kind: EventKind::DataChanged,
            path: path.into(),
            stat: Stat::default(),
            data: revision.to_be_bytes().to_vec(),
            prev: None,
        }];
        let events_cf = db.cf_handle(cf::EVENTS).expect("events cf");
        db.put_cf(events_cf, codec::u64_key(revision), codec::encode(&events))
            .expect("put");
        hub.publish(vec![RevisionEvents { revision, events }], revision);
    }

    fn node_watch(id: i64, path: &str, start_revision: u64) -> WatchSpec {
        WatchSpec {
            id,
            path: path.into(),
            scope: Scope::Node,
            kinds: 0,
            start_revision,
            one_shot: false,
            prev_value: false,
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        db: Arc<rocksdb::DB>,
        hub: WatchHub,
        commands: mpsc::UnboundedSender<Command>,
        out: mpsc::UnboundedReceiver<(i64, Delivery)>,
        running: prometheus_client::metrics::gauge::Gauge,
        published: u64,
        /// Revisions delivered, by watch, in order of delivery.
        delivered: HashMap<i64, Vec<u64>>,
        canceled: Vec<(i64, String)>,
    }

    /// A hub and an event history in a fresh RocksDB.
    fn context() -> (tempfile::TempDir, Arc<rocksdb::DB>, Arc<WatchContext>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_db(dir.path()).expect("db");
        let ctx = Arc::new(WatchContext {
            hub: WatchHub::new(0),
            log: crate::storage::events::EventLog::new(
                db.clone(),
                crate::storage::table_writer::Written::always(),
            ),
            progress_interval: std::time::Duration::from_secs(3600),
            running: prometheus_client::metrics::gauge::Gauge::default(),
        });
        (dir, db, ctx)
    }

    fn setup() -> Setup {
        let (dir, db, ctx) = context();
        let (commands, rx) = mpsc::unbounded_channel();
        let (tx, out) = mpsc::unbounded_channel();
        let (hub, running) = (ctx.hub.clone(), ctx.running.clone());
        tokio::spawn(serve(
            ctx,
            Arc::new(Collect(tx)),
            UnboundedReceiverStream::new(rx),
        ));
        Setup {
            _dir: dir,
            db,
            hub,
            commands,
            out,
            running,
            published: 0,
            delivered: HashMap::new(),
            canceled: Vec::new(),
        }
    }

    impl Setup {
        /// Applies one revision that changes `path`: stored first, then published, as apply does.
        fn write(&mut self, path: &str) {
            self.published += 1;
            store_and_publish(&self.db, &self.hub, self.published, path);
        }

        fn watch(&self, id: i64, path: &str, start_revision: u64) {
            let spec = node_watch(id, path, start_revision);
            let _ = self.commands.send(Command::Create(Ok(spec)));
        }

        /// Moves what the stream delivered into `delivered` and `canceled`.
        fn drain(&mut self) {
            while let Ok((id, d)) = self.out.try_recv() {
                match d {
                    Delivery::Events(selected) => self
                        .delivered
                        .entry(id)
                        .or_default()
                        .push(selected.revision()),
                    Delivery::Canceled { reason, .. } => self.canceled.push((id, reason)),
                    Delivery::Created { .. } | Delivery::Progress { .. } => {}
                }
            }
        }

        /// Lets the stream's tasks run until `done` holds; fails after 10 s.
        async fn until(&mut self, what: &str, done: impl Fn(&Setup) -> bool) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                self.drain();
                if done(self) {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "not in 10 s: {what}");
                tokio::task::yield_now().await;
            }
        }

        /// How many revisions watch `id` has received.
        fn count(&self, id: i64) -> usize {
            self.delivered.get(&id).map_or(0, Vec::len)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stream_left_behind_by_the_hub_catches_up_from_storage_without_gaps() {
        let mut s = setup();
        s.watch(1, "/a", 0);
        s.watch(2, "/b", 0);
        s.until("both watches created", |s| s.running.get() == 2)
            .await;
        // Far more revisions than the hub holds, without letting the stream task run.
        let total = LIVE_BUFFER_REVISIONS as u64 + 1000;
        for _ in 0..total {
            s.write("/a");
        }
        s.until("the history delivered", |s| s.count(1) >= total as usize)
            .await;
        // And some more once it is live again.
        for _ in 0..10 {
            s.write("/a");
        }
        s.write("/b");
        let all = total as usize + 10;
        s.until("the live revisions delivered", |s| {
            s.count(1) >= all && s.count(2) == 1
        })
        .await;
        let got = s.delivered.remove(&1).unwrap_or_default();
        let want: Vec<u64> = (1..=total + 10).collect();
        assert_eq!(got.len(), want.len(), "{} revisions delivered", got.len());
        assert_eq!(got, want);
        assert!(s.canceled.is_empty(), "{:?}", s.canceled);
        assert_eq!(s.running.get(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn watches_from_the_past_go_live_without_a_gap_or_a_repeat() {
        let mut s = setup();
        for _ in 0..300 {
            s.write("/a");
        }
        // Each starts in the past: a catch-up task reads the history while writes go on, and
        // what the stream received meanwhile is read again at the hand-back.
        let starts = [(7, 5), (8, 1), (9, 290), (10, 150), (11, 299)];
        for (id, start) in starts {
            s.watch(id, "/a", start);
            for _ in 0..40 {
                s.write("/a");
                tokio::task::yield_now().await;
            }
        }
        s.write("/a");
        let last = s.published;
        let reached = |s: &Setup, ids: &[i64], revision: u64| {
            ids.iter()
                .all(|id| s.delivered.get(id).and_then(|r| r.last()) == Some(&revision))
        };
        s.until("every watch at the last revision", |s| {
            reached(s, &[7, 8, 9, 10, 11], last)
        })
        .await;
        for (id, start) in starts {
            let want: Vec<u64> = (start..=last).collect();
            assert_eq!(s.delivered[&id], want, "watch {id}");
        }
        assert!(s.canceled.is_empty(), "{:?}", s.canceled);
        assert_eq!(s.running.get(), 5);

        // Cancel: acknowledged, gone from the count, and nothing more is delivered (the
        // stream's task delivers a revision to all its live watches in one pass).
        let _ = s.commands.send(Command::Cancel(7));
        s.until("the cancel acknowledged", |s| !s.canceled.is_empty())
            .await;
        s.write("/a");
        let next = s.published;
        s.until("the next revision at the other watches", |s| {
            reached(s, &[8, 9, 10, 11], next)
        })
        .await;
        assert_eq!(s.running.get(), 4);
        assert_eq!(s.canceled, [(7, "canceled by the client".to_owned())]);
        assert_eq!(
            s.delivered[&7].last(),
            Some(&last),
            "delivered after the cancel"
        );
    }

    /// The stream received revisions after a catch-up's last look at the hub and before its
    /// hand-back: the hand-back reads them from storage, then the watch is live.
    #[tokio::test(flavor = "current_thread")]
    async fn a_hand_back_behind_the_stream_reads_what_it_missed_from_storage() {
        let (_dir, db, ctx) = context();
        for revision in 1..=50 {
            store_and_publish(&db, &ctx.hub, revision, "/a");
        }
        let (tx, mut out) = mpsc::unbounded_channel();
        let (handback, _handbacks) = mpsc::unbounded_channel();
        let mut w = Watches {
            ctx: ctx.clone(),
            out: Arc::new(Collect(tx)),
            live: HashMap::new(),
            catching_up: HashMap::new(),
            handback,
            next_id: 1,
            generation: 1,
            seen: 50,
        };
        ctx.running.inc();
        let done = tokio::spawn(async {});
        w.catching_up.insert(
            3,
            CatchingUp {
                generation: 1,
                task: done,
            },
        );
        // A stale hand-back (an earlier watch with the same id) changes nothing.
        w.handback(Handback {
            id: 3,
            generation: 0,
            spec: node_watch(3, "/a", 1),
            next: Some(1),
        })
        .await;
        assert!(out.try_recv().is_err());
        w.handback(Handback {
            id: 3,
            generation: 1,
            spec: node_watch(3, "/a", 1),
            next: Some(41),
        })
        .await;
        let events = |out: &mut mpsc::UnboundedReceiver<(i64, Delivery)>| {
            let mut got = Vec::new();
            while let Ok((3, Delivery::Events(selected))) = out.try_recv() {
                got.push(selected.revision());
            }
            got
        };
        assert_eq!(events(&mut out), (41..=50).collect::<Vec<u64>>());
        assert_eq!(w.live.get(&3).map(|l| l.next), Some(51));
        store_and_publish(&db, &ctx.hub, 51, "/a");
        let events_51 = db
            .cf_handle(cf::EVENTS)
            .and_then(|h| db.get_cf(h, codec::u64_key(51)).ok().flatten())
            .expect("stored");
        let rev = Arc::new(RevisionEvents {
            revision: 51,
            events: codec::decode("events", &events_51).expect("decode"),
        });
        // Delivered once, even if the stream sees the revision twice.
        w.revision(&rev).await;
        w.revision(&rev).await;
        assert_eq!(events(&mut out), [51]);
        assert_eq!(ctx.running.get(), 1);
    }
}
