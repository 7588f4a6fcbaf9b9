//! Catching up a member that fell behind: through a snapshot once the leader has compacted its
//! log, and by replaying its own data dir after a restart (including a whole-cluster restart).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use kord_e2e::*;

/// The expected value of every key after [`snapshot_load`] (None: deleted).
fn expected_after_load() -> BTreeMap<String, Option<String>> {
    (0..400)
        .map(|i| {
            let value = if i % 20 == 1 {
                None
            } else if i % 5 == 0 {
                Some(format!("v{i}-b"))
            } else {
                Some(format!("v{i}"))
            };
            (format!("/snap/k{i:03}"), value)
        })
        .collect()
}

/// 500 writes spread over `clients`: 400 creates, 80 sets, 20 deletes.
async fn snapshot_load(clients: &[Kv]) {
    let n = clients.len();
    let creates = stream::iter(0..400usize).map(|i| {
        let mut kv = clients[i % n].clone();
        async move {
            let path = format!("/snap/k{i:03}");
            kv.create(create_req(&path, format!("v{i}")))
                .await
                .unwrap_or_else(|e| panic!("create {path}: {e}"));
        }
    });
    creates.buffer_unordered(8).collect::<Vec<()>>().await;
    let updates = stream::iter(0..400usize)
        .filter(|i| std::future::ready(i % 5 == 0 || i % 20 == 1))
        .map(|i| {
            let mut kv = clients[i % n].clone();
            async move {
                let path = format!("/snap/k{i:03}");
                if i % 20 == 1 {
                    kv.delete(delete_req(&path, Some(0)))
                        .await
                        .unwrap_or_else(|e| panic!("delete {path}: {e}"));
                } else {
                    kv.set(set_req(&path, format!("v{i}-b"), Some(0)))
                        .await
                        .unwrap_or_else(|e| panic!("set {path}: {e}"));
                }
            }
        });
    updates.buffer_unordered(8).collect::<Vec<()>>().await;
}

/// Checks every expected key through Local reads on member `id`.
async fn assert_member_has(
    c: &Cluster,
    id: u64,
    parent: &str,
    expected: &BTreeMap<String, Option<String>>,
) {
    let mut kv = c.kv(id);
    let listing = children(&mut kv, parent, LOCAL)
        .await
        .unwrap_or_else(|e| panic!("local children of {parent} on member {id}: {e}"));
    let want: Vec<String> = expected
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(p, _)| p[parent.len() + 1..].to_string())
        .collect();
    assert_eq!(listing.names, want, "children of {parent} on member {id}");
    let bad: Vec<String> = stream::iter(expected.iter())
        .map(|(path, value)| {
            let mut kv = kv.clone();
            async move {
                let got = get(&mut kv, path, LOCAL).await;
                match (value, got) {
                    (Some(v), Ok(r)) if r.data == v.as_bytes() => None,
                    (None, Err(e)) if e.code() == tonic::Code::NotFound => None,
                    (v, got) => Some(format!("{path}: want {v:?}, got {got:?}")),
                }
            }
        })
        .buffer_unordered(16)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    assert!(bad.is_empty(), "member {id} has wrong data: {bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_through_a_snapshot() {
    // Snapshots every 20 entries: the load's 500 writes make anywhere from ~60 entries (8
    // commands each, as the leader batches concurrent writes) to 500.
    let opts =
        ClusterOpts::new().args(["--snapshot-count", "20", "--snapshot-catchup-entries", "10"]);
    let mut c = Cluster::start(3, opts).await;
    let leader = c.leader().await;
    let lagging = c.followers().await[0];
    c.kv(leader)
        .create(create_req("/snap", b""))
        .await
        .expect("create /snap");
    let statuses = c.wait_converged(Duration::from_secs(20)).await;
    let before = statuses
        .iter()
        .find(|s| s.member_id == lagging)
        .expect("status")
        .clone();
    let leader_snapshot_before = c
        .status(leader)
        .await
        .expect("leader status")
        .snapshot_index;

    c.kill(lagging);
    let live: Vec<Kv> = c.live_ids().into_iter().map(|id| c.kv(id)).collect();
    snapshot_load(&live).await;

    // The leader snapshotted well past the end of the lagging log: more than the 10 entries it
    // keeps behind a snapshot, so the entries the lagging member needs next are purged.
    let lagging_end = before.last_log_index;
    let leader_status = wait_until("the leader to snapshot past the lagging member's log", Duration::from_secs(30), || {
        let c = &c;
        async move {
            let s = c.status(leader).await.map_err(|e| e.to_string())?;
            if s.snapshot_index > leader_snapshot_before && s.snapshot_index > lagging_end + 20 {
                Ok(s)
            } else {
                Err(format!(
                    "leader snapshot_index {} (was {leader_snapshot_before}), lagging log ends at {lagging_end}",
                    s.snapshot_index
                ))
            }
        }
    })
    .await;
    eprintln!(
        "leader: snapshot_index {}, last_log_index {}, applied {}; lagging member stopped at log index {lagging_end}",
        leader_status.snapshot_index, leader_status.last_log_index, leader_status.applied_index
    );

    c.restart(lagging).await;
    let statuses = c.wait_converged(Duration::from_secs(60)).await;
    assert_same_state(&statuses);
    let caught_up = statuses
        .iter()
        .find(|s| s.member_id == lagging)
        .expect("status");
    assert!(
        caught_up.snapshot_index > lagging_end,
        "the caught-up member reports snapshot_index {} (its log ended at {lagging_end})",
        caught_up.snapshot_index
    );
    let expected = expected_after_load();
    assert_member_has(&c, lagging, "/snap", &expected).await;

    // The caught-up member takes part normally: a write through it reaches everyone.
    c.kv(lagging)
        .create(create_req("/snap/after", b"a"))
        .await
        .expect("write via caught-up member");
    for id in c.ids() {
        let got = get(&mut c.kv(id), "/snap/after", LINEARIZABLE)
            .await
            .expect("get /snap/after");
        assert_eq!(got.data, b"a");
    }
    let statuses = c.wait_converged(Duration::from_secs(20)).await;
    assert_same_state(&statuses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_members_resume_from_their_data_dirs() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    let mut expected = BTreeMap::new();
    c.kv(leader)
        .create(create_req("/r", b""))
        .await
        .expect("create /r");
    for i in 0..20 {
        let path = format!("/r/k{i:02}");
        c.kv(leader)
            .create(create_req(&path, format!("{i}")))
            .await
            .expect("create");
        expected.insert(path, Some(format!("{i}")));
    }

    // Kill the leader; write through the survivors; the old leader rejoins and catches up.
    c.kill(leader);
    let survivors: Vec<Kv> = c.live_ids().into_iter().map(|id| c.kv(id)).collect();
    let retry = Retry::default();
    for i in 20..50usize {
        let path = format!("/r/k{i:02}");
        let req = create_req(&path, format!("{i}"));
        retry_rotating(&survivors, i, &retry, |mut kv| {
            let req = req.clone();
            async move { kv.create(req).await }
        })
        .await
        .unwrap_or_else(|e| panic!("create {path} after the leader was killed: {e:?}"));
        expected.insert(path, Some(format!("{i}")));
    }
    c.restart(leader).await;
    let statuses = c.wait_converged(Duration::from_secs(30)).await;
    assert_same_state(&statuses);
    assert_member_has(&c, leader, "/r", &expected).await;
    let znodes = statuses[0].znode_count;

    // Kill every member, restart them all from their data dirs: nothing is lost.
    for id in c.ids() {
        c.kill(id);
    }
    for id in c.ids() {
        c.restart(id).await;
    }
    let statuses = c.wait_converged(Duration::from_secs(30)).await;
    assert_same_state(&statuses);
    assert_eq!(
        statuses[0].znode_count, znodes,
        "znode_count changed across a full restart"
    );
    for id in c.ids() {
        assert_member_has(&c, id, "/r", &expected).await;
    }
    let leader = c.leader().await;
    c.kv(leader)
        .create(create_req("/r/after", b"x"))
        .await
        .expect("write after full restart");
}

/// The log since the last snapshot is bounded in bytes as well as in entries: large values in
/// few entries still lead to a snapshot, the segments behind it are deleted, and the member
/// restarts from it with every value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_outgrows_snapshot_log_bytes_is_snapshotted_and_purged() {
    let opts = ClusterOpts::new().args([
        "--snapshot-count",
        "1000000",
        "--snapshot-log-bytes",
        "1048576",
        "--log-segment-size",
        "1048576",
        "--snapshot-catchup-entries",
        "5",
    ]);
    let mut c = Cluster::start(1, opts).await;
    let id = c.ids()[0];
    let mut kv = c.kv(id);
    for i in 0..20 {
        kv.create(create_req(&format!("/small{i:02}"), "x"))
            .await
            .expect("small create");
    }
    // The trigger looks once a second: two looks at a log far under the bound take nothing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        c.status(id).await.expect("status").snapshot_index,
        0,
        "a snapshot of a log far under --snapshot-log-bytes"
    );

    // 96 values of 64 KiB: 6 MiB of log in about 100 entries.
    let value = vec![b'v'; 64 * 1024];
    for i in 0..96 {
        kv.create(create_req(&format!("/big{i:02}"), &value))
            .await
            .expect("big create");
    }
    let last = c.status(id).await.expect("status").last_log_index;
    let status = wait_until(
        "a snapshot of the big values",
        Duration::from_secs(20),
        || {
            let c = &c;
            async move {
                let s = c.status(id).await.map_err(|e| e.to_string())?;
                if s.snapshot_index >= last - 50 {
                    Ok(s)
                } else {
                    Err(format!(
                        "snapshot_index {}, log ends at {last}",
                        s.snapshot_index
                    ))
                }
            }
        },
    )
    .await;
    eprintln!(
        "snapshot at {} of {} entries",
        status.snapshot_index, status.last_log_index
    );
    let log_dir = c.data_dir(id).join("raft-log");
    wait_until(
        "the log segments behind the snapshot to be deleted",
        Duration::from_secs(20),
        || {
            let log_dir = log_dir.clone();
            async move {
                let segments = std::fs::read_dir(&log_dir)
                    .map_err(|e| e.to_string())?
                    .count();
                // 6 MiB were written into 1 MiB segments; left: the segment being written, the
                // spare and at most two holding the entries kept behind the snapshot.
                if segments <= 4 {
                    Ok(())
                } else {
                    Err(format!("{segments} files in {}", log_dir.display()))
                }
            }
        },
    )
    .await;

    c.kill(id);
    c.restart(id).await;
    let kv = c.kv(id);
    for path in ["/small00", "/small19", "/big00", "/big95"] {
        let got = wait_until(
            &format!("{path} after the restart"),
            Duration::from_secs(20),
            || {
                let mut kv = kv.clone();
                async move { get(&mut kv, path, LOCAL).await.map_err(|e| e.to_string()) }
            },
        )
        .await;
        let want: &[u8] = if path.starts_with("/big") {
            &value
        } else {
            b"x"
        };
        assert!(got.data == want, "{path} after the restart");
    }
}
