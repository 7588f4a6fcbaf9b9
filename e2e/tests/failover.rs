//! Leader failover under concurrent load: kill -9 the leader while writers create unique
//! paths with WriteIds; every acknowledged write survives exactly once on every member.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use kord_e2e::v1::CreateRequest;
use kord_e2e::*;

const WRITERS: usize = 8;
const PER_WRITER: usize = 300;
const LOAD_BUDGET: Duration = Duration::from_secs(20);

#[derive(Debug, Default)]
struct WriterReport {
    attempted: Vec<String>,
    acked: Vec<String>,
    /// Gave up after retrying: may or may not have applied.
    unknown: Vec<String>,
    failures: Vec<String>,
    retried: usize,
}

async fn writer(
    w: usize,
    clients: Vec<Kv>,
    load_start: Instant,
    acked_count: Arc<AtomicUsize>,
) -> WriterReport {
    let mut report = WriterReport::default();
    let mut ids = WriteIds::new();
    let retry = Retry {
        budget: Duration::from_secs(15),
        attempt_timeout: Duration::from_secs(3),
        backoff: Duration::from_millis(50),
    };
    for i in 0..PER_WRITER {
        if load_start.elapsed() > LOAD_BUDGET {
            break;
        }
        let path = format!("/load/w{w}-{i:04}");
        // Built once: every retry carries the same WriteId.
        let req = CreateRequest {
            write_id: Some(ids.next_id()),
            path: path.clone(),
            data: path.clone().into_bytes(),
            ..Default::default()
        };
        report.attempted.push(path.clone());
        // Start on different members so that followers forward writes too.
        let outcome = retry_rotating(&clients, w + i, &retry, |mut kv| {
            let req = req.clone();
            async move { kv.create(req).await }
        })
        .await;
        match outcome {
            Ok(done) => {
                if done.attempts > 1 {
                    report.retried += 1;
                }
                if done.value.path != path {
                    report
                        .failures
                        .push(format!("{path}: acknowledged as {:?}", done.value.path));
                }
                report.acked.push(path);
                acked_count.fetch_add(1, Ordering::Relaxed);
            }
            // ALREADY_EXISTS here would mean a retry was applied twice instead of deduplicated.
            Err(RetryError::Rejected { status, attempts }) => report.failures.push(format!(
                "{path}: rejected after {attempts} attempts: {:?} {}",
                status.code(),
                status.message()
            )),
            Err(RetryError::GaveUp { last, attempts }) => {
                eprintln!(
                    "writer {w}: gave up on {path} after {attempts} attempts: {:?} {}",
                    last.code(),
                    last.message()
                );
                report.unknown.push(path);
                break;
            }
        }
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_under_load_keeps_every_acknowledged_write_exactly_once() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let first_leader = c.leader().await;
    c.kv(first_leader)
        .create(create_req("/load", b""))
        .await
        .expect("create /load");

    let clients = c.kv_all();
    let acked_count = Arc::new(AtomicUsize::new(0));
    let load_start = Instant::now();
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(w, clients.clone(), load_start, acked_count.clone())))
        .collect();

    // Let the load run for about a second, making progress, then kill -9 the leader.
    wait_until("the load to make progress", Duration::from_secs(20), || {
        let n = acked_count.load(Ordering::Relaxed);
        async move {
            if n >= 20 && load_start.elapsed() >= Duration::from_secs(1) {
                Ok(())
            } else {
                Err(format!(
                    "{n} writes acknowledged after {:?}",
                    load_start.elapsed()
                ))
            }
        }
    })
    .await;
    let old_leader = c.leader().await;
    let acked_at_kill = acked_count.load(Ordering::Relaxed);
    c.kill(old_leader);
    let killed_at = Instant::now();
    let new_leader = c.wait_for_leader(Duration::from_secs(30)).await;
    assert_ne!(
        new_leader, old_leader,
        "the killed member cannot still be the leader"
    );
    let acked_at_new_leader = acked_count.load(Ordering::Relaxed);
    eprintln!(
        "killed leader {old_leader} after {acked_at_kill} acks; member {new_leader} took over in {:?}",
        killed_at.elapsed()
    );

    let mut reports = Vec::new();
    for h in handles {
        reports.push(h.await.expect("writer task panicked"));
    }
    let total_acked: usize = reports.iter().map(|r| r.acked.len()).sum();
    let failures: Vec<&String> = reports.iter().flat_map(|r| &r.failures).collect();
    let unknown: HashSet<String> = reports
        .iter()
        .flat_map(|r| r.unknown.iter().cloned())
        .collect();
    let acked: HashSet<String> = reports
        .iter()
        .flat_map(|r| r.acked.iter().cloned())
        .collect();
    let attempted: HashSet<String> = reports
        .iter()
        .flat_map(|r| r.attempted.iter().cloned())
        .collect();
    eprintln!(
        "load: {} attempted, {total_acked} acknowledged ({} after a retry), {} unknown, {} failed, in {:?}",
        attempted.len(),
        reports.iter().map(|r| r.retried).sum::<usize>(),
        unknown.len(),
        failures.len(),
        load_start.elapsed()
    );
    assert!(failures.is_empty(), "writes failed: {failures:#?}");
    assert_eq!(acked.len(), total_acked, "a path was acknowledged twice");
    assert!(
        total_acked > acked_at_new_leader,
        "no write was acknowledged after member {new_leader} took over ({total_acked} in all)"
    );

    // Bring the killed member back and let everyone converge.
    c.restart(old_leader).await;
    let statuses = c.wait_converged(Duration::from_secs(60)).await;
    assert_same_state(&statuses);

    let allowed: HashSet<&String> = acked.iter().chain(unknown.iter()).collect();
    let mut views: Vec<(u64, BTreeSet<String>)> = Vec::new();
    for id in c.ids() {
        let mut kv = c.kv(id);
        let listing = children(&mut kv, "/load", LOCAL)
            .await
            .unwrap_or_else(|e| panic!("local children of /load on member {id}: {e}"));
        let present: BTreeSet<String> =
            listing.names.iter().map(|n| format!("/load/{n}")).collect();
        assert_eq!(
            present.len(),
            listing.names.len(),
            "member {id} lists a child twice"
        );
        assert_eq!(
            listing.stat.expect("stat of /load").num_children as usize,
            present.len(),
            "member {id}: num_children of /load disagrees with its listing"
        );
        let missing: Vec<&String> = acked.iter().filter(|p| !present.contains(*p)).collect();
        assert!(
            missing.is_empty(),
            "member {id} lost {} acknowledged writes: {missing:?}",
            missing.len()
        );
        let unexpected: Vec<&String> = present.iter().filter(|p| !allowed.contains(p)).collect();
        assert!(
            unexpected.is_empty(),
            "member {id} has nodes that were never attempted or that failed: {unexpected:?}"
        );
        assert!(present.iter().all(|p| attempted.contains(p)));

        // Every acknowledged node is readable on this member, with its data.
        let bad: Vec<String> = stream::iter(acked.iter().cloned())
            .map(|path| {
                let mut kv = kv.clone();
                async move {
                    match get(&mut kv, &path, LOCAL).await {
                        Ok(r) if r.data == path.as_bytes() => None,
                        Ok(r) => Some(format!(
                            "{path}: data {:?}",
                            String::from_utf8_lossy(&r.data)
                        )),
                        Err(e) => Some(format!("{path}: {:?} {}", e.code(), e.message())),
                    }
                }
            })
            .buffer_unordered(16)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        assert!(
            bad.is_empty(),
            "member {id}: bad reads of acknowledged nodes: {bad:?}"
        );
        views.push((id, present));
    }
    for (id, view) in &views[1..] {
        assert_eq!(
            view, &views[0].1,
            "member {id} and member {} list different nodes",
            views[0].0
        );
    }
    let digests = c.digests().await;
    assert!(
        digests
            .windows(2)
            .all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2),
        "(member, applied, digest) differ: {digests:?}"
    );
}
