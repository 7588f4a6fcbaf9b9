//! Watches on real processes: ordered, unique, atomic, reliable and resumable event streams,
//! one-shot and scoped watches, progress notifications, compaction, slow consumers, and
//! expiry deletions reaching watchers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kord_e2e::v1::kv_client::KvClient;
use kord_e2e::v1::lease_client::LeaseClient;
use kord_e2e::v1::{
    CompactRequest, CreateRequest, Event, EventType, LeaseGrantRequest, TxnRequest,
    WatchCreateRequest, WatchResponse, WatchScope,
};
use kord_e2e::*;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(5);

fn subtree(path: &str, start_revision: u64) -> WatchCreateRequest {
    WatchCreateRequest {
        path: path.into(),
        scope: WatchScope::Subtree as i32,
        start_revision,
        ..Default::default()
    }
}

/// Reads event messages of watch `id` until one at or past `revision`.
async fn events_until(conn: &mut WatchConn, id: i64, revision: u64) -> Vec<WatchResponse> {
    let mut got = Vec::new();
    loop {
        let r = conn.expect(T, "watch events").await;
        assert!(!r.canceled, "watch canceled: {}", r.cancel_reason);
        if r.watch_id != id || r.events.is_empty() {
            continue;
        }
        let rev = revision_of(&r);
        got.push(r);
        if rev >= revision {
            return got;
        }
    }
}

fn kinds(events: &[Event]) -> Vec<(i32, String)> {
    events.iter().map(|e| (e.r#type, e.path.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_semantics_on_one_member() {
    let c = Cluster::start(
        1,
        ClusterOpts::new().args(["--watch-progress-interval", "300ms"]),
    )
    .await;
    let mut kv = c.kv(1);
    kv.create(create_req("/w", b"")).await.expect("create /w");
    let mut conn = WatchConn::open(c.channel(1)).await.expect("open watch");
    conn.create(WatchCreateRequest {
        prev_value: true,
        watch_id: 7,
        ..subtree("/w", 0)
    })
    .await;
    let created = conn.expect(T, "created").await;
    assert!(created.created && created.watch_id == 7);

    let r1 = kv
        .create(create_req("/w/a", b"1"))
        .await
        .expect("create")
        .into_inner()
        .header
        .unwrap()
        .revision;
    let r2 = kv
        .set(set_req("/w/a", b"2", None))
        .await
        .expect("set")
        .into_inner()
        .header
        .unwrap()
        .revision;
    let txn = TxnRequest {
        ops: vec![
            op_create("/w/b", b"", false),
            op_set("/w/a", b"3", None),
            op_delete("/w/b", None),
        ],
        ..Default::default()
    };
    let r3 = kv
        .txn(txn)
        .await
        .expect("txn")
        .into_inner()
        .header
        .unwrap()
        .revision;
    let r4 = kv
        .delete(delete_req("/w/a", None))
        .await
        .expect("delete")
        .into_inner()
        .header
        .unwrap()
        .revision;
    assert!(r1 < r2 && r2 < r3 && r3 < r4);

    let got = events_until(&mut conn, 7, r4).await;
    let revs: Vec<u64> = got.iter().map(revision_of).collect();
    assert_eq!(
        revs,
        vec![r1, r2, r3, r4],
        "one message per revision, in order"
    );
    let created_ev = EventType::Created as i32;
    let changed = EventType::DataChanged as i32;
    let deleted = EventType::Deleted as i32;
    let children = EventType::ChildrenChanged as i32;
    // A multi-op arrives whole, in op order.
    assert_eq!(
        kinds(&got[2].events),
        vec![
            (created_ev, "/w/b".into()),
            (children, "/w".into()),
            (changed, "/w/a".into()),
            (deleted, "/w/b".into()),
            (children, "/w".into()),
        ]
    );
    let set = &got[1].events[0];
    assert_eq!(
        (set.r#type, set.data.as_slice(), set.prev_data.as_slice()),
        (changed, &b"2"[..], &b"1"[..])
    );
    assert_eq!(
        got[3].events[0].prev_data, b"3",
        "a deletion carries the value it removed"
    );

    // Resumable: starting at r2 gives exactly the same messages from r2 on.
    let mut again = WatchConn::open(c.channel(1)).await.expect("open watch");
    again
        .create(WatchCreateRequest {
            prev_value: true,
            watch_id: 1,
            ..subtree("/w", r2)
        })
        .await;
    let resumed = events_until(&mut again, 1, r4).await;
    let strip = |rs: &[WatchResponse]| -> Vec<(u64, Vec<Event>)> {
        rs.iter()
            .map(|r| (revision_of(r), r.events.clone()))
            .collect()
    };
    assert_eq!(strip(&resumed), strip(&got[1..]));

    // Progress: on request, and on its own when idle.
    conn.request_progress().await;
    let p = loop {
        let r = conn.expect(T, "progress").await;
        if r.progress {
            break r;
        }
    };
    assert!(
        revision_of(&p) >= r4,
        "progress {} before the last write {r4}",
        revision_of(&p)
    );

    // One-shot children watch: fires once, for the first change only.
    conn.create(WatchCreateRequest {
        path: "/w".into(),
        scope: WatchScope::Children as i32,
        types: vec![children],
        one_shot: true,
        watch_id: 9,
        ..Default::default()
    })
    .await;
    loop {
        if conn.expect(T, "one-shot created").await.watch_id == 9 {
            break;
        }
    }
    kv.create(create_req("/w/c1", b"")).await.expect("create");
    kv.create(create_req("/w/c2", b"")).await.expect("create");
    let mut fired = Vec::new();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        if let Some(Ok(r)) = conn.next(Duration::from_millis(200)).await {
            if r.watch_id == 9 && !r.events.is_empty() {
                fired.push(r);
            }
        }
    }
    assert_eq!(
        fired.len(),
        1,
        "a one-shot watch fired {} times",
        fired.len()
    );
    assert_eq!(kinds(&fired[0].events), vec![(children, "/w".into())]);

    // Compaction: a watch starting at or below the compaction point is refused with it.
    let compacted = kv
        .compact(CompactRequest {
            revision: r3,
            ..Default::default()
        })
        .await
        .expect("compact")
        .into_inner()
        .compacted_revision;
    assert_eq!(compacted, r3);
    let mut late = WatchConn::open(c.channel(1)).await.expect("open watch");
    late.create(WatchCreateRequest {
        watch_id: 3,
        ..subtree("/w", r2)
    })
    .await;
    let refused = loop {
        let r = late.expect(T, "compacted cancel").await;
        if r.canceled {
            break r;
        }
    };
    assert_eq!(refused.compact_revision, r3);
    assert!(
        refused.cancel_reason.contains("compacted"),
        "{}",
        refused.cancel_reason
    );
    late.create(WatchCreateRequest {
        watch_id: 4,
        ..subtree("/w", r3 + 1)
    })
    .await;
    let after = events_until(&mut late, 4, r4).await;
    assert_eq!(revision_of(&after[0]), r4);

    // Bad input: a malformed path cancels that watch with a reason naming it.
    late.create(WatchCreateRequest {
        watch_id: 5,
        ..subtree("/bad/", 0)
    })
    .await;
    let bad = loop {
        let r = late.expect(T, "invalid path cancel").await;
        if r.watch_id == 5 {
            break r;
        }
    };
    assert!(
        bad.canceled && bad.cancel_reason.contains("/bad/"),
        "{bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_canceled_and_resumes_without_gaps() {
    let c = Cluster::start(1, ClusterOpts::new().args(["--watch-buffer", "16"])).await;
    let mut kv = c.kv(1);
    kv.create(create_req("/s", b"")).await.expect("create /s");
    let mut conn = WatchConn::open(c.channel(1)).await.expect("open watch");
    conn.create(WatchCreateRequest {
        watch_id: 1,
        ..subtree("/s", 0)
    })
    .await;
    assert!(conn.expect(T, "created").await.created);
    // Enough data to fill the transport's window and then the stream's buffer, unread.
    let value = vec![b'x'; 8192];
    let mut writes = Vec::new();
    for i in 0..300 {
        let r = kv
            .create(create_req(&format!("/s/{i:03}"), &value))
            .await
            .expect("create");
        writes.push(r.into_inner().header.unwrap().revision);
    }
    // The consumer stalls past the server's grace period (2 s) with its buffer full.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut seen = Vec::new();
    let cancel = loop {
        let r = conn.expect(T, "events then a cancel").await;
        if r.canceled {
            break r;
        }
        seen.push(revision_of(&r));
    };
    assert!(
        cancel.cancel_reason.contains("slow consumer"),
        "{}",
        cancel.cancel_reason
    );
    assert!(seen.len() < writes.len(), "the watch was never behind");
    let resume = seen.last().map_or(writes[0], |r| r + 1);
    conn.create(WatchCreateRequest {
        watch_id: 2,
        ..subtree("/s", resume)
    })
    .await;
    let last = *writes.last().unwrap();
    let rest = events_until(&mut conn, 2, last).await;
    seen.extend(rest.iter().map(revision_of));
    assert_eq!(
        seen, writes,
        "resuming after the cancel lost or repeated revisions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_deletions_on_expiry_reach_watchers() {
    let c = Cluster::start(3, ClusterOpts::new().args(["--lease-ttl-min", "1s"])).await;
    let leader = c.leader().await;
    let mut kv = c.kv(leader);
    kv.create(create_req("/svc", b""))
        .await
        .expect("create /svc");
    let follower = c.followers().await[0];
    let mut conn = WatchConn::open(c.channel(follower))
        .await
        .expect("open watch");
    conn.create(WatchCreateRequest {
        path: "/svc".into(),
        scope: WatchScope::Children as i32,
        watch_id: 1,
        ..Default::default()
    })
    .await;
    assert!(conn.expect(T, "created").await.created);
    let lease = LeaseClient::new(c.channel(leader))
        .grant(LeaseGrantRequest {
            ttl_ms: 1000,
            ..Default::default()
        })
        .await
        .expect("grant")
        .into_inner()
        .id;
    kv.create(CreateRequest {
        lease_id: lease,
        ..create_req("/svc/e", b"")
    })
    .await
    .expect("ephemeral");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "no deletion event after the lease expired"
        );
        let r = conn.expect(T, "events").await;
        if r.events
            .iter()
            .any(|e| e.r#type == EventType::Deleted as i32 && e.path == "/svc/e")
        {
            break;
        }
    }
}

/// What a watcher received: each revision with its events, in arrival order.
type RecordedLog = Arc<Mutex<Vec<(u64, Vec<Event>)>>>;

/// A watcher that follows the whole tree from revision 1, resuming on another member after
/// any failure, and records every message it is given.
async fn follow(
    channels: Vec<Channel>,
    first: usize,
    log: RecordedLog,
    stop: tokio::sync::watch::Receiver<bool>,
) -> usize {
    let mut member = first;
    let mut resumes = 0;
    while !*stop.borrow() {
        let next = log.lock().unwrap().last().map_or(1, |(r, _)| r + 1);
        let Ok(mut conn) = WatchConn::open(channels[member].clone()).await else {
            member = (member + 1) % channels.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        conn.create(WatchCreateRequest {
            watch_id: 1,
            ..subtree("/", next)
        })
        .await;
        loop {
            if *stop.borrow() {
                return resumes;
            }
            match conn.next(Duration::from_millis(500)).await {
                Some(Ok(r)) if r.canceled => panic!("watch canceled: {}", r.cancel_reason),
                Some(Ok(r)) if !r.events.is_empty() => {
                    log.lock().unwrap().push((revision_of(&r), r.events))
                }
                Some(Ok(_)) => {}
                None if conn.next(Duration::ZERO).await.is_none() => {
                    // Timed out: idle or the member is gone; a progress request tells which.
                    conn.request_progress().await;
                    match conn.next(Duration::from_secs(2)).await {
                        Some(Ok(r)) if !r.events.is_empty() => {
                            log.lock().unwrap().push((revision_of(&r), r.events))
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
                _ => break,
            }
        }
        resumes += 1;
        member = (member + 1) % channels.len();
    }
    resumes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_stay_ordered_unique_atomic_and_complete_through_kills() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let channels: Vec<Channel> = c.ids().into_iter().map(|id| c.channel(id)).collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let logs: Vec<_> = (0..3).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
    let watchers: Vec<_> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| tokio::spawn(follow(channels.clone(), i, log.clone(), stop_rx.clone())))
        .collect();

    c.kv(c.leader().await)
        .create(create_req("/m", b""))
        .await
        .expect("create /m");
    // Mixed writes from several clients, retried with the same write id through any member:
    // per path, create, set, a txn (create a sibling, set), delete.
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let clients: Vec<KvClient<Channel>> =
                channels.iter().cloned().map(KvClient::new).collect();
            tokio::spawn(async move {
                let mut ids = WriteIds::new();
                let retry = Retry::default();
                let deadline = Instant::now() + Duration::from_secs(20);
                for i in 0..120u64 {
                    if Instant::now() > deadline {
                        break;
                    }
                    let path = format!("/m/w{w}-{}", i / 4);
                    let write_id = Some(ids.next_id());
                    let i2 = i as usize;
                    let _ = match i % 4 {
                        0 => retry_rotating(&clients, i2, &retry, |mut kv| {
                            let req = CreateRequest {
                                write_id,
                                ..create_req(&path, b"c")
                            };
                            async move { kv.create(req).await }
                        })
                        .await
                        .is_ok(),
                        1 => retry_rotating(&clients, i2, &retry, |mut kv| {
                            let mut req = set_req(&path, format!("v{i}"), None);
                            req.write_id = write_id;
                            async move { kv.set(req).await }
                        })
                        .await
                        .is_ok(),
                        2 => retry_rotating(&clients, i2, &retry, |mut kv| {
                            let req = TxnRequest {
                                write_id,
                                ops: vec![
                                    op_create(&format!("{path}-t"), b"", false),
                                    op_set(&path, b"t", None),
                                ],
                            };
                            async move { kv.txn(req).await }
                        })
                        .await
                        .is_ok(),
                        _ => retry_rotating(&clients, i2, &retry, |mut kv| {
                            let mut req = delete_req(&path, None);
                            req.write_id = write_id;
                            async move { kv.delete(req).await }
                        })
                        .await
                        .is_ok(),
                    };
                }
            })
        })
        .collect();
    c.kv(c.leader().await)
        .create(create_req("/m", b""))
        .await
        .ok();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = c.leader().await;
    c.kill(leader);
    c.wait_for_leader(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.restart(leader).await;
    let follower = c.followers().await[0];
    c.kill(follower);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.restart(follower).await;
    for w in writers {
        w.await.expect("writer");
    }
    let statuses = c.wait_converged(Duration::from_secs(30)).await;
    assert_same_state(&statuses);
    let last = statuses[0].revision;

    // The reference: the stored history, read in one go from one member.
    let mut reference = Vec::new();
    let mut conn = WatchConn::open(c.channel(c.leader().await))
        .await
        .expect("open watch");
    conn.create(WatchCreateRequest {
        watch_id: 1,
        ..subtree("/", 1)
    })
    .await;
    loop {
        conn.request_progress().await;
        let r = conn.expect(T, "reference").await;
        if !r.events.is_empty() {
            reference.push((revision_of(&r), r.events));
        } else if r.progress && revision_of(&r) >= last {
            break;
        }
    }
    assert!(
        reference.len() > 100,
        "too little history: {}",
        reference.len()
    );
    let final_rev = reference.last().unwrap().0;
    wait_until("watchers caught up", Duration::from_secs(30), || {
        let behind: Vec<u64> = logs
            .iter()
            .map(|l| l.lock().unwrap().last().map_or(0, |(r, _)| *r))
            .filter(|r| *r < final_rev)
            .collect();
        async move {
            if behind.is_empty() {
                Ok(())
            } else {
                Err(format!("at {behind:?}, want {final_rev}"))
            }
        }
    })
    .await;
    stop_tx.send(true).expect("stop");
    for w in watchers {
        w.await.expect("watcher");
    }
    for (i, log) in logs.iter().enumerate() {
        let log = log.lock().unwrap();
        let revs: Vec<u64> = log.iter().map(|(r, _)| *r).collect();
        assert!(
            revs.windows(2).all(|w| w[0] < w[1]),
            "watcher {i}: out of order or repeated revisions"
        );
        let by_rev: BTreeMap<u64, &Vec<Event>> = log.iter().map(|(r, e)| (*r, e)).collect();
        for (rev, events) in &reference {
            let got = by_rev
                .get(rev)
                .unwrap_or_else(|| panic!("watcher {i} missed revision {rev}"));
            assert_eq!(
                *got, events,
                "watcher {i}: revision {rev} differs (atomicity)"
            );
        }
        assert_eq!(
            log.len(),
            reference.len(),
            "watcher {i}: revisions outside the history"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watches_get_progress_and_history_is_compacted_by_retention() {
    let args = [
        "--watch-progress-interval",
        "300ms",
        "--event-retention",
        "20",
        "--reap-interval",
        "200ms",
    ];
    let c = Cluster::start(3, ClusterOpts::new().args(args)).await;
    let leader = c.leader().await;
    let mut kv = c.kv(leader);
    let mut last = 0;
    for i in 0..60 {
        last = kv
            .create(create_req(&format!("/r{i}"), b""))
            .await
            .expect("create")
            .into_inner()
            .header
            .unwrap()
            .revision;
    }
    // An idle watch hears, unasked, that everything up to the last write was delivered.
    let mut conn = WatchConn::open(c.channel(c.followers().await[0]))
        .await
        .expect("open watch");
    conn.create(WatchCreateRequest {
        watch_id: 1,
        ..subtree("/r-none", 0)
    })
    .await;
    let progress = loop {
        let r = conn.expect(Duration::from_secs(3), "idle progress").await;
        if r.progress {
            break r;
        }
    };
    assert!(revision_of(&progress) >= last);
    // The leader compacts to keep about 20 revisions, and every member follows.
    wait_until(
        "history compacted on every member",
        Duration::from_secs(10),
        || {
            let c = &c;
            async move {
                let points: Vec<u64> = c
                    .statuses()
                    .await
                    .iter()
                    .map(|s| s.compacted_revision)
                    .collect();
                if points.iter().all(|p| *p + 40 >= last && *p > 0) {
                    Ok(())
                } else {
                    Err(format!("{points:?} (last {last})"))
                }
            }
        },
    )
    .await;
    assert_same_state(&c.wait_converged(Duration::from_secs(10)).await);
}

/// Revisions of the next `n` event messages of a client watch, each within `T`.
async fn next_revisions(w: &mut kord_client::WatchStream, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(T, w.next()).await {
            Ok(Some(Ok(kord_client::WatchEvent::Events { revision, .. }))) => got.push(revision),
            Ok(Some(Ok(kord_client::WatchEvent::Progress { .. }))) => {}
            other => panic!("after {} events: {other:?}", got.len()),
        }
    }
    got
}

/// A client's watches share one gRPC stream. A consumer that stops reading holds up no other
/// watch of its client: the client cancels its watch on the server once the consumer's buffer
/// is full, and creates it again from the revision after the last one taken when it reads
/// again, so it still gets every revision once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_watches_share_a_stream_and_a_stalled_consumer_stalls_only_itself() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let client = kord_client::Client::connect([c.client_addr(1).to_string()])
        .await
        .expect("client");
    client.create("/m", "").await.expect("create /m");
    let options = kord_client::WatchOptions::default;
    let mut reading = client.watch("/m", options()).await.expect("watch");
    let mut stalled = client.watch("/m", options()).await.expect("watch");
    let mut elsewhere = client.watch("/other", options()).await.expect("watch");
    assert_eq!(c.metric(1, "kord_watch_streams").await, 1, "one stream");
    assert_eq!(c.metric(1, "kord_watches").await, 3);
    let created = r#"kord_requests_total{op="watch",code="ok"}"#;
    let creations = c.metric(1, created).await;
    assert_eq!(creations, 3);

    // Far more revisions than a consumer's buffer holds (64), read by one watch only.
    const WRITES: usize = 300;
    let mut written = Vec::new();
    for i in 0..WRITES {
        let stat = client.set("/m", i.to_string(), None).await.expect("set");
        written.push(stat.modify_revision);
    }
    assert_eq!(next_revisions(&mut reading, WRITES).await, written);
    assert!(
        c.metric(1, created).await > creations,
        "the stalled watch was never paused and created again"
    );

    // The stalled consumer reads now: every revision, once, in order.
    assert_eq!(next_revisions(&mut stalled, WRITES).await, written);
    // A watch on another path of the same stream saw none of it and still works.
    let other = client.create("/other", "").await.expect("create /other");
    assert_eq!(
        next_revisions(&mut elsewhere, 1).await,
        [other.stat.create_revision]
    );

    // Dropping a watch cancels it on the server; the last one closes the stream.
    drop(stalled);
    c.wait_metric(1, "kord_watches", 2, T).await;
    drop(reading);
    drop(elsewhere);
    c.wait_metric(1, "kord_watch_streams", 0, T).await;
}
