//! A member killed with SIGKILL right after its last acknowledged write restarts with every
//! acknowledged write, at the revision it was acknowledged with. The state machine writes
//! RocksDB without its WAL, so such a kill loses the state applied since RocksDB's last flush;
//! the member must apply those entries again from its Raft log, and must never have deleted a
//! log segment whose entries were not yet flushed (snapshots purge the log every few hundred
//! entries here).

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use kord_e2e::*;

const ROUNDS: usize = 3;
const WRITERS: usize = 16;
const PER_WRITER: usize = 40;

/// The applied index the member loaded from RocksDB at its latest start ("loaded the state
/// machine applied_index=N" in its log).
fn loaded_applied_index(log: &str) -> Option<u64> {
    log.lines()
        .rfind(|l| l.contains("loaded the state machine"))
        .and_then(|l| l.split("applied_index=").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_acknowledged_writes_loses_none_of_them() {
    let opts = ClusterOpts::new().args([
        "--snapshot-count",
        "100",
        "--snapshot-catchup-entries",
        "10",
        "--log-segment-size",
        "1048576",
    ]);
    let mut c = Cluster::start(1, opts).await;
    let id = c.ids()[0];
    c.kv(id)
        .create(create_req("/crash", b""))
        .await
        .expect("create /crash");
    // path -> (data, revision it was acknowledged with)
    let mut acked: BTreeMap<String, (Vec<u8>, u64)> = BTreeMap::new();
    let mut reapplied_rounds = 0;
    for round in 0..ROUNDS {
        let kv = c.kv(id);
        let results: Vec<(String, Vec<u8>, u64)> = stream::iter(0..WRITERS)
            .map(|w| {
                let mut kv = kv.clone();
                async move {
                    let mut done = Vec::new();
                    for i in 0..PER_WRITER {
                        let path = format!("/crash/r{round}-w{w:02}-{i:03}");
                        // 4 KiB values fill the 1 MiB segments quickly.
                        let data = format!("{path}:").into_bytes().repeat(200);
                        let resp = kv
                            .create(create_req(&path, &data))
                            .await
                            .unwrap_or_else(|e| panic!("create {path}: {e}"))
                            .into_inner();
                        let stat = resp.stat.expect("stat in CreateResponse");
                        done.push((path, data, stat.create_revision));
                    }
                    done
                }
            })
            .buffer_unordered(WRITERS)
            .flat_map(stream::iter)
            .collect()
            .await;
        let last_log_index = c.status(id).await.expect("status").last_log_index;
        for (path, data, revision) in results {
            acked.insert(path, (data, revision));
        }
        // Right after the last acknowledgement: nothing gets a chance to flush.
        c.kill(id);
        c.restart(id).await;
        c.wait_for_leader(Duration::from_secs(20)).await;
        let log = std::fs::read_to_string(c.log_path(id)).expect("member log");
        let loaded = loaded_applied_index(&log).expect("a 'loaded the state machine' line");
        eprintln!("round {round}: loaded applied index {loaded}, log ended at {last_log_index}");
        if loaded < last_log_index {
            reapplied_rounds += 1;
        }

        let mut kv = c.kv(id);
        for (path, (data, revision)) in &acked {
            let got = get(&mut kv, path, LINEARIZABLE)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {path} after SIGKILL: {e}"));
            assert_eq!(&got.data, data, "round {round}: data of {path}");
            let stat = got.stat.expect("stat");
            assert_eq!(
                stat.create_revision, *revision,
                "round {round}: {path} has another revision than the one acknowledged"
            );
        }
    }
    // The test means something only if the kills did lose applied state that had to be
    // applied again, and if the log was purged behind snapshots meanwhile.
    assert!(
        reapplied_rounds > 0,
        "no restart loaded a state older than the log: the re-apply path was not exercised"
    );
    let status = c.status(id).await.expect("status");
    assert!(
        status.snapshot_index > 0,
        "no snapshot was taken, so the log was never purged"
    );
    let segments = std::fs::read_dir(c.data_dir(id).join("raft-log"))
        .expect("raft-log dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .count();
    let written_mib = acked.values().map(|(d, _)| d.len()).sum::<usize>() >> 20;
    assert!(
        segments < written_mib,
        "{segments} segment files of 1 MiB for {written_mib} MiB written: the log was not purged"
    );
}

/// A member's local reads never go back in time across a crash: killed with SIGKILL and
/// restarted alone (no leader to learn the commit point from), it applies again from its log
/// everything it had applied before, because the commit point it stored survives the crash
/// (`server/src/storage/commit_point.rs`); its tables, written without RocksDB's WAL, do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_alone_serves_every_write_it_had_applied() {
    let mut c = Cluster::start(3, ClusterOpts::new()).await;
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    let follower = c.followers().await[0];
    let mut kv = c.kv(leader);
    let paths: Vec<String> = (0..50).map(|i| format!("/applied-{i:02}")).collect();
    for path in &paths {
        kv.create(create_req(path, path.as_bytes()))
            .await
            .unwrap_or_else(|e| panic!("create {path}: {e}"));
    }
    let commit = c.status(leader).await.expect("leader status").commit_index;
    c.wait_applied_equal(commit, Duration::from_secs(10)).await;

    // The others first, so that nothing can commit after the follower's last apply.
    for id in c.ids() {
        if id != follower {
            c.kill(id);
        }
    }
    let before = c
        .status(follower)
        .await
        .expect("follower status")
        .applied_index;
    c.kill(follower);
    c.restart(follower).await;
    let log = std::fs::read_to_string(c.log_path(follower)).expect("member log");
    let loaded = loaded_applied_index(&log).expect("a 'loaded the state machine' line");
    assert!(
        loaded < before,
        "the tables held every entry ({loaded} >= {before}): the re-apply was not exercised"
    );
    // It is the only live member: this waits for its own applied index.
    let applied = c.wait_applied_equal(before, Duration::from_secs(10)).await[0].applied_index;
    assert_eq!(applied, before, "it applied entries nobody committed");
    let mut kv = c.kv(follower);
    for path in &paths {
        let got = get(&mut kv, path, LOCAL)
            .await
            .unwrap_or_else(|e| panic!("local read of {path} after the restart: {e}"));
        assert_eq!(got.data, path.as_bytes(), "data of {path}");
    }
}

#[test]
fn the_loaded_applied_index_is_read_from_the_last_start() {
    let log = "2026 INFO kord_server::storage::state_machine: loaded the state machine applied_index=7 revision=9\n\
               x\n\
               2026 INFO kord_server::storage::state_machine: loaded the state machine applied_index=42 revision=50\n";
    assert_eq!(loaded_applied_index(log), Some(42));
    assert_eq!(loaded_applied_index("nothing"), None);
}
