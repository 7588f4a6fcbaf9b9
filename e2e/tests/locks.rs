//! Locks and elections on real processes: FIFO hand-off with one wake-up per release,
//! strictly increasing fencing tokens, timeouts that withdraw the claim, ownership checks,
//! and mutual exclusion of `kordctl lock` holders through kills, a leader kill and a pause.

use std::time::{Duration, Instant};

use kord_e2e::v1::election_client::ElectionClient;
use kord_e2e::v1::lease_client::LeaseClient;
use kord_e2e::v1::lock_client::LockClient;
use kord_e2e::v1::{
    CampaignRequest, LeaderRequest, LeaseGrantRequest, LockRequest, ProclaimRequest, ResignRequest,
    UnlockRequest,
};
use kord_e2e::*;
use tonic::transport::Channel;
use tonic::Code;

async fn lease(c: &Cluster, id: u64) -> u64 {
    LeaseClient::new(c.channel(id))
        .grant(LeaseGrantRequest {
            ttl_ms: 60_000,
            ..Default::default()
        })
        .await
        .expect("grant")
        .into_inner()
        .id
}

fn lock_req(name: &str, lease_id: u64, timeout_ms: u64) -> LockRequest {
    LockRequest {
        name: name.into(),
        lease_id,
        timeout_ms,
    }
}

async fn wakeups(c: &Cluster, id: u64) -> u64 {
    c.metric(id, "kord_claim_wakeups_total").await
}

/// Starts a blocking `Lock("F")` of `lease` through member `via` and waits until `leader`
/// counts it as a wait it serves; returns the pending call.
async fn forwarded_wait(c: &Cluster, via: u64, leader: u64, lease: u64, what: &str) -> PendingLock {
    let before = served(c, leader).await;
    let mut client = LockClient::new(c.channel(via));
    let wait = tokio::spawn(async move { client.lock(lock_req("F", lease, 0)).await });
    wait_until(what, T, || async {
        if served(c, leader).await > before {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    wait
}

/// A `Lock` call running in its own task.
type PendingLock =
    tokio::task::JoinHandle<Result<tonic::Response<kord_e2e::v1::LockResponse>, tonic::Status>>;

/// Fails, showing its answer, if a `Lock` call that must still be waiting has returned.
async fn assert_waiting(wait: &mut PendingLock, what: &str) {
    if wait.is_finished() {
        let answer = wait.await.expect("join");
        panic!("{what}: {answer:?}");
    }
}

/// The answer of a pending `Lock` call, which must come within `T`.
async fn granted(wait: PendingLock, what: &str) -> kord_e2e::v1::LockResponse {
    tokio::time::timeout(T, wait)
        .await
        .unwrap_or_else(|_| panic!("{what}: not in time"))
        .expect("join")
        .unwrap_or_else(|e| panic!("{what}: {e}"))
        .into_inner()
}

/// Waits forwarded to member `id` by followers.
async fn served(c: &Cluster, id: u64) -> u64 {
    c.metric(id, "kord_claim_waits_served_total").await
}

async fn queue_len(c: &Cluster, id: u64, name: &str) -> usize {
    children(&mut c.kv(id), &format!("/kord/locks/{name}"), LINEARIZABLE)
        .await
        .map(|r| r.names.len())
        .unwrap_or(0)
}

/// Waits until lock `name`'s queue on member `id` holds `n` claims.
async fn wait_queue(c: &Cluster, id: u64, name: &str, n: usize, what: &str) {
    wait_until(what, T, || async {
        match queue_len(c, id, name).await {
            len if len == n => Ok(()),
            len => Err(format!("{len} claims")),
        }
    })
    .await;
}

/// Releases the claim `key` of `lease_id` through member `id`.
async fn unlock(
    c: &Cluster,
    id: u64,
    key: &str,
    lease_id: u64,
) -> Result<tonic::Response<kord_e2e::v1::UnlockResponse>, tonic::Status> {
    LockClient::new(c.channel(id))
        .unlock(UnlockRequest {
            key: key.to_owned(),
            lease_id,
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_hand_off_in_order_with_one_wakeup_each() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let ch: Channel = c.channel(1);
    let (a, b, d) = (lease(&c, 1).await, lease(&c, 1).await, lease(&c, 1).await);
    let mut locks = LockClient::new(ch.clone());
    let held = locks
        .lock(lock_req("L", a, 0))
        .await
        .expect("a locks")
        .into_inner();

    // A bounded wait gives up and leaves no claim behind.
    let err = locks
        .lock(lock_req("L", b, 300))
        .await
        .expect_err("b times out");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    wait_queue(&c, 1, "L", 1, "b's claim withdrawn").await;

    // B, then D, queue up; releases hand the lock on in that order.
    let mut lb = LockClient::new(ch.clone());
    let wait_b = tokio::spawn(async move { lb.lock(lock_req("L", b, 0)).await });
    wait_queue(&c, 1, "L", 2, "b queued").await;
    let mut ld = LockClient::new(ch.clone());
    let mut wait_d = tokio::spawn(async move { ld.lock(lock_req("L", d, 0)).await });
    wait_queue(&c, 1, "L", 3, "d queued").await;

    let before = wakeups(&c, 1).await;
    let wrong = unlock(&c, 1, &held.key, b)
        .await
        .expect_err("b cannot unlock a's claim");
    assert_eq!(wrong.code(), Code::PermissionDenied, "{wrong}");
    unlock(&c, 1, &held.key, a).await.expect("a unlocks");
    let got_b = granted(wait_b, "b locks").await;
    assert!(got_b.fencing_token > held.fencing_token);
    assert_waiting(&mut wait_d, "d returned while b held the lock").await;
    assert_eq!(
        wakeups(&c, 1).await - before,
        1,
        "one release woke more than one waiter"
    );

    // The holder's session ends: the next waiter gets the lock, with a higher token.
    LeaseClient::new(ch.clone())
        .revoke(kord_e2e::v1::LeaseRevokeRequest {
            id: b,
            ..Default::default()
        })
        .await
        .expect("revoke b");
    let got_d = granted(wait_d, "d locks").await;
    assert!(got_d.fencing_token > got_b.fencing_token);
    assert_eq!(wakeups(&c, 1).await - before, 2);
    let gone = unlock(&c, 1, &got_b.key, b)
        .await
        .expect_err("b's claim is gone");
    assert_eq!(gone.code(), Code::NotFound);
    let bad = locks
        .lock(lock_req("a/b", d, 0))
        .await
        .expect_err("bad name");
    assert_eq!(bad.code(), Code::InvalidArgument);
    // A timeout too large for the clock means no deadline (it used to overflow the clock).
    let forever = locks
        .lock(lock_req("M", d, u64::MAX))
        .await
        .expect("a free lock with a huge timeout")
        .into_inner();
    assert!(forever.fencing_token > got_d.fencing_token);
}

const T: Duration = Duration::from_secs(10);

/// Concurrent `Lock` calls of one lease, sent to different members, queue once: both get the
/// same claim (apply decides, so there is no window between a look and a create).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_locks_of_one_lease_share_one_claim() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    let (a, b) = (lease(&c, leader).await, lease(&c, leader).await);
    let held = LockClient::new(c.channel(leader))
        .lock(lock_req("C", a, 0))
        .await
        .expect("a locks")
        .into_inner();
    let waits: Vec<_> = c
        .ids()
        .into_iter()
        .map(|id| {
            let mut locks = LockClient::new(c.channel(id));
            tokio::spawn(async move { locks.lock(lock_req("C", b, 0)).await })
        })
        .collect();
    wait_queue(&c, leader, "C", 2, "b's claim queued").await;
    unlock(&c, leader, &held.key, a).await.expect("a unlocks");
    let mut keys = Vec::new();
    for w in waits {
        let got = granted(w, "b locks").await;
        assert!(got.fencing_token > held.fencing_token);
        keys.push(got.key);
    }
    keys.dedup();
    assert_eq!(keys.len(), 1, "one lease queued more than once: {keys:?}");
    assert_eq!(queue_len(&c, leader, "C").await, 1);
}

/// A waiter whose client talks to a follower waits on the leader (the follower forwards the
/// wait), so the leader's wake-up hands the lock on. When the leader is killed mid-wait, the
/// wait fails over without an error: the lock is still handed on once, in order, with a
/// higher fencing token, and later waits are forwarded to the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_waits_run_on_the_leader_and_survive_its_death() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    let followers = c.followers().await;
    let (f1, f2) = (followers[0], followers[1]);
    let (a, b, d) = (
        lease(&c, leader).await,
        lease(&c, leader).await,
        lease(&c, leader).await,
    );
    let mut at_f2 = LockClient::new(c.channel(f2));
    let held = at_f2
        .lock(lock_req("F", a, 0))
        .await
        .expect("a locks")
        .into_inner();

    // A bounded wait through a follower times out on the leader and leaves no claim.
    let before = served(&c, leader).await;
    let err = LockClient::new(c.channel(f1))
        .lock(lock_req("F", b, 300))
        .await
        .expect_err("b times out");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(
        served(&c, leader).await > before,
        "the wait was not forwarded"
    );
    wait_queue(&c, f1, "F", 1, "b's claim withdrawn").await;

    // B waits through follower f1; the wait reaches the leader, then the leader dies.
    let mut wait_b = forwarded_wait(&c, f1, leader, b, "b's wait forwarded to the leader").await;
    assert_eq!(queue_len(&c, f1, "F").await, 2);
    c.kill(leader);
    let new_leader = c.wait_for_leader(Duration::from_secs(20)).await;
    assert_waiting(&mut wait_b, "b returned while a held the lock").await;

    // A releases through f2 (retried while the cluster settles); B gets the lock next.
    wait_until("a unlocks", T, || {
        let mut at_f2 = at_f2.clone();
        let key = held.key.clone();
        async move {
            match at_f2.unlock(UnlockRequest { key, lease_id: a }).await {
                Ok(_) => Ok(()),
                // An earlier attempt that failed in transit may have deleted it.
                Err(e) if e.code() == Code::NotFound => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    let got_b = granted(wait_b, "b locks after the failover").await;
    assert!(got_b.fencing_token > held.fencing_token);

    // The remaining follower forwards to the new leader.
    let follower = if new_leader == f1 { f2 } else { f1 };
    let mut wait_d = forwarded_wait(
        &c,
        follower,
        new_leader,
        d,
        "d's wait forwarded to the new leader",
    )
    .await;
    assert_waiting(&mut wait_d, "d returned while b held the lock").await;
    let wakeups_before = wakeups(&c, new_leader).await;
    unlock(&c, new_leader, &got_b.key, b)
        .await
        .expect("b unlocks");
    let got_d = granted(wait_d, "d locks").await;
    assert!(got_d.fencing_token > got_b.fencing_token);
    assert_eq!(
        wakeups(&c, new_leader).await - wakeups_before,
        1,
        "the release woke one waiter, on the leader"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_campaign_proclaim_observe_resign() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let leader_member = c.leader().await;
    let follower = c.followers().await[0];
    let (a, b) = (
        lease(&c, leader_member).await,
        lease(&c, leader_member).await,
    );
    let mut e = ElectionClient::new(c.channel(follower));
    let mut observe = ElectionClient::new(c.channel(follower))
        .observe(LeaderRequest { name: "E".into() })
        .await
        .expect("observe")
        .into_inner();
    let first = observe.message().await.expect("observe").expect("first");
    assert!(first.leader.is_none(), "nobody leads yet");

    let la = e
        .campaign(CampaignRequest {
            name: "E".into(),
            lease_id: a,
            value: b"a".to_vec(),
            timeout_ms: 0,
        })
        .await
        .expect("a campaigns")
        .into_inner()
        .leader
        .expect("leader key");
    let mut eb = ElectionClient::new(c.channel(leader_member));
    let wait_b = tokio::spawn(async move {
        eb.campaign(CampaignRequest {
            name: "E".into(),
            lease_id: b,
            value: b"b".to_vec(),
            timeout_ms: 0,
        })
        .await
    });
    let now = e
        .leader(LeaderRequest { name: "E".into() })
        .await
        .expect("leader")
        .into_inner();
    assert_eq!(
        (
            now.leader.as_ref().map(|l| l.key.clone()),
            now.value.clone()
        ),
        (Some(la.key.clone()), b"a".to_vec())
    );
    e.proclaim(ProclaimRequest {
        leader: Some(la.clone()),
        value: b"a2".to_vec(),
    })
    .await
    .expect("proclaim");
    let mut seen = Vec::new();
    while seen.last().map(|v: &Vec<u8>| v.as_slice()) != Some(b"a2") {
        let r = tokio::time::timeout(T, observe.message())
            .await
            .expect("observe in time")
            .expect("observe")
            .expect("update");
        seen.push(r.value);
    }
    e.resign(ResignRequest {
        leader: Some(la.clone()),
    })
    .await
    .expect("resign");
    let lb = tokio::time::timeout(T, wait_b)
        .await
        .expect("b elected in time")
        .expect("join")
        .expect("b")
        .into_inner()
        .leader
        .expect("key");
    assert!(lb.fencing_token > la.fencing_token);
    let denied = e
        .proclaim(ProclaimRequest {
            leader: Some(la),
            value: b"stale".to_vec(),
        })
        .await
        .expect_err("a no longer leads");
    assert!(
        matches!(denied.code(), Code::NotFound | Code::PermissionDenied),
        "{denied}"
    );
    loop {
        let r = tokio::time::timeout(T, observe.message())
            .await
            .expect("observe in time")
            .expect("observe")
            .expect("update");
        if r.leader.as_ref().map(|l| l.key.as_str()) == Some(lb.key.as_str()) {
            assert_eq!(r.value, b"b");
            break;
        }
    }
}

/// `kordctl lock` holders append to a shared log under the lock through a guard that refuses
/// stale fencing tokens; holders are killed, paused past their session and the leader dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kordctl_lock_holders_never_overlap_through_chaos() {
    let mut c = Cluster::start(3, ClusterOpts::new().args(["--session-timeout-min", "1s"])).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("work.log");
    let guard = dir.path().join("highest-token");
    std::fs::write(&guard, "0").expect("guard file");
    // The guarded resource: under flock, refuse a token below the highest seen, else record
    // enter, work for a moment, record exit.
    let script = format!(
        r#"set -e
exec 9>"{g}.lock"
accept() {{ flock 9; hi=$(cat "{g}"); if [ "$KORD_FENCING_TOKEN" -lt "$hi" ]; then echo "reject $KORD_FENCING_TOKEN" >> "{l}"; flock -u 9; exit 3; fi; echo "$KORD_FENCING_TOKEN" > "{g}"; echo "$1 $KORD_FENCING_TOKEN $(date +%s%N)" >> "{l}"; flock -u 9; }}
accept enter
sleep 0.2
accept exit"#,
        g = guard.display(),
        l = log.display()
    );
    let spawn_holder = |c: &Cluster| {
        tokio::process::Command::new(kordctl_bin())
            .args([
                "--endpoints",
                &c.endpoints_csv(),
                "lock",
                "work",
                "--session-timeout",
                "2s",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kordctl lock")
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut holders: Vec<tokio::process::Child> = (0..4).map(|_| spawn_holder(&c)).collect();
    let mut round = 0u32;
    while Instant::now() < deadline && round < 12 {
        round += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
        match round {
            3 => {
                let _ = holders[0].start_kill();
            }
            5 => {
                let l = c.leader().await;
                c.kill(l);
                c.wait_for_leader(Duration::from_secs(20)).await;
                c.restart(l).await;
            }
            7 => {
                // Paused well past its 2 s session: it must not write on waking up.
                if let Some(pid) = holders[1].id() {
                    let _ = std::process::Command::new("kill")
                        .args(["-STOP", &pid.to_string()])
                        .status();
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    let _ = std::process::Command::new("kill")
                        .args(["-CONT", &pid.to_string()])
                        .status();
                }
            }
            _ => {}
        }
        for h in holders.iter_mut() {
            if let Ok(Some(_)) = h.try_wait() {
                *h = spawn_holder(&c);
            }
        }
    }
    for mut h in holders {
        let _ = h.start_kill();
        let _ = h.wait().await;
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // Accepted work is ordered by token; a newer holder may only enter over an unfinished
    // interval whose holder was killed or paused (at most the two such faults above), and a
    // stale holder's later write is refused, never accepted.
    let mut open: Option<u64> = None;
    let mut last_token = 0u64;
    let mut works = 0;
    let mut superseded = 0;
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["enter", token, _] => {
                let token: u64 = token.parse().expect("token");
                assert!(
                    token > last_token,
                    "token {token} after {last_token}:\n{text}"
                );
                if open.is_some() {
                    superseded += 1;
                }
                open = Some(token);
                last_token = token;
            }
            ["exit", token, _] => {
                let token: u64 = token.parse().expect("token");
                assert_eq!(
                    Some(token),
                    open,
                    "exit of {token} accepted while {open:?} held:\n{text}"
                );
                open = None;
                works += 1;
            }
            ["reject", _] => {}
            _ => panic!("unexpected line {line:?}"),
        }
    }
    assert!(
        superseded <= 2,
        "{superseded} intervals overlapped by a newer holder:\n{text}"
    );
    assert!(works >= 5, "only {works} completed pieces of work:\n{text}");
}
