//! Membership administration against real clusters: member list, add/promote, remove, replace
//! under load, the safety rules (one change at a time, a majority of voters kept, ids never
//! reused, removed members stopped), observers, leadership transfer and `kordctl member`.

use std::collections::BTreeMap;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kord_client::{Client, ClientBuilder, MemberList, MemberRole, NewMember};
use kord_e2e::ports::free_ports;
use kord_e2e::v1::WatchCreateRequest;
use kord_e2e::*;
use serde_json::Value;
use tonic::Code;

const CHANGE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(30);

async fn client_for(c: &Cluster, ids: &[u64]) -> Client {
    ClientBuilder::new(ids.iter().map(|&id| c.client_addr(id).to_string()))
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("client")
}

async fn client(c: &Cluster) -> Client {
    client_for(c, &c.live_ids()).await
}

fn roles(list: &MemberList) -> BTreeMap<u64, MemberRole> {
    list.members
        .iter()
        .map(|m| (m.id, MemberRole::try_from(m.role).expect("known role")))
        .collect()
}

/// Waits until the leader's member list satisfies `check`.
async fn wait_members<F>(client: &Client, what: &str, check: F) -> MemberList
where
    F: Fn(&MemberList) -> bool,
{
    wait_until(what, WAIT, || async {
        let list = client.member_list().await.map_err(|e| e.to_string())?;
        if check(&list) {
            Ok(list)
        } else {
            Err(format!("members: {:?}", roles(&list)))
        }
    })
    .await
}

fn peer_of(c: &Cluster, id: u64) -> String {
    c.peer_addr(id).to_string()
}

#[track_caller]
fn assert_refused(err: kord_client::Error, code: Code, needle: &str) {
    assert_eq!(err.code(), code, "unexpected error: {err}");
    assert!(
        err.message().contains(needle),
        "message {:?} does not mention {needle:?}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_reports_roles_leader_and_progress() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    let follower = c.followers().await[0];
    c.kv(leader)
        .create(create_req("/x", b"1"))
        .await
        .expect("create");
    // Asked through a follower only: the call is forwarded to the leader.
    let via_follower = client_for(&c, &[follower]).await;
    let list = wait_members(&via_follower, "followers caught up and contacted", |l| {
        l.members
            .iter()
            .all(|m| m.lag == 0 && m.last_contact_ms.is_some())
    })
    .await;
    assert_eq!(list.leader_id, leader);
    assert!(!list.change_in_progress);
    assert_eq!(
        roles(&list),
        BTreeMap::from([
            (1, MemberRole::Voter),
            (2, MemberRole::Voter),
            (3, MemberRole::Voter)
        ])
    );
    for m in &list.members {
        assert_eq!(m.is_leader, m.id == leader, "{m:?}");
        assert!(m.matched_index > 0, "{m:?}");
        assert_eq!(m.peer_addr, peer_of(&c, m.id));
        assert_eq!(m.client_addr, c.client_addr(m.id).to_string());
        let contact = m.last_contact_ms.expect("last contact on the leader");
        if m.id == leader {
            assert_eq!(contact, 0);
        } else {
            // Heartbeats every 100 ms.
            assert!(contact < 5_000, "{m:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learner_is_added_waits_until_caught_up_then_is_promoted() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    for i in 0..50 {
        c.kv(leader)
            .create(create_req(&format!("/before-{i}"), b"v"))
            .await
            .expect("create");
    }
    let admin = client(&c).await;
    // The new member asks to join as a learner; the operator's AddMember resumes that (same
    // id and address) and returns once it has caught up.
    c.spawn_joining(4, &["--join-as-learner", "--name", "kord-3"]);
    let new = NewMember {
        id: 4,
        peer_addr: peer_of(&c, 4),
        client_addr: c.client_addr(4).to_string(),
        name: "kord-3".into(),
        learner_only: true,
        wait_caught_up: true,
        max_lag: 5,
        ..Default::default()
    };
    let members = admin.add_member(new, CHANGE).await.expect("add learner");
    let m4 = members.iter().find(|m| m.id == 4).expect("member 4 listed");
    assert_eq!(m4.role, MemberRole::Learner as i32);
    assert_eq!(m4.name, "kord-3");
    assert!(m4.lag <= 5, "caught up within max_lag: {m4:?}");

    let members = admin.promote_member(4, 5, CHANGE).await.expect("promote 4");
    let m4 = members.iter().find(|m| m.id == 4).expect("member 4 listed");
    assert_eq!(m4.role, MemberRole::Voter as i32);
    // Promoting a voter again is a no-op, so a retried call succeeds.
    admin
        .promote_member(4, 5, CHANGE)
        .await
        .expect("promote again");

    let got = get(&mut c.kv(4), "/before-49", LINEARIZABLE)
        .await
        .expect("read on the new voter");
    assert_eq!(got.data, b"v");
    let statuses = c.wait_converged(WAIT).await;
    assert_same_state(&statuses);
    for s in &statuses {
        let roles: Vec<_> = s.members.iter().map(|m| (m.id, m.role)).collect();
        assert!(
            roles.contains(&(4, MemberRole::Voter as i32)),
            "member {} sees {roles:?}",
            s.member_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_keeps_serving_keeps_a_majority_and_never_reuses_the_id() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    let followers = c.followers().await;
    let (gone, kept) = (followers[0], followers[1]);
    // Through a follower only: every change is forwarded to the leader.
    let admin = client_for(&c, &[kept]).await;

    let err = admin.remove_member(leader, CHANGE).await.unwrap_err();
    assert_refused(err, Code::FailedPrecondition, "transfer leadership");

    let members = admin.remove_member(gone, CHANGE).await.expect("remove");
    assert!(members.iter().all(|m| m.id != gone), "{members:?}");
    // The removed member learns it was removed and stops, saying why.
    let status = c.wait_exit(gone, WAIT).await;
    assert!(!status.success(), "removed member exited with {status}");
    assert!(
        c.log_tail(gone, 200).contains("removed from the cluster"),
        "log of member {gone}:\n{}",
        c.log_tail(gone, 40)
    );

    // The two left keep serving.
    c.kv(kept)
        .create(create_req("/after-removal", b"1"))
        .await
        .expect("write after removal");
    let got = get(&mut c.kv(leader), "/after-removal", LINEARIZABLE)
        .await
        .expect("read");
    assert_eq!(got.data, b"1");
    // Retrying the removal is harmless.
    admin.remove_member(gone, CHANGE).await.expect("retry");

    // 1 of 2 voters is not a majority of the current voters.
    let err = admin.remove_member(kept, CHANGE).await.unwrap_err();
    assert_refused(err, Code::FailedPrecondition, "fewer than a majority");

    // The id is never reused, even with a fresh address.
    let fresh = NewMember {
        id: gone,
        peer_addr: format!("127.0.0.1:{}", free_ports(1)[0]),
        learner_only: true,
        ..Default::default()
    };
    let err = admin.add_member(fresh, CHANGE).await.unwrap_err();
    assert_refused(err, Code::AlreadyExists, "never reused");

    // Restarted on its old data, the removed member is refused and stops again.
    respawn_refused(&mut c, gone, 2, "restarted removed member").await;

    // Wiped and started again under its old id, it is still refused: ids are never reused.
    std::fs::remove_dir_all(c.data_dir(gone)).expect("wipe the removed member's data");
    respawn_refused(&mut c, gone, 3, "wiped removed member").await;
    let list = admin.member_list().await.expect("list");
    assert_eq!(list.members.len(), 2, "{:?}", roles(&list));
}

/// Starts removed member `id` again (its `start`-th run) and checks that it stops, non-zero,
/// saying in that run's log that it was removed from the cluster.
async fn respawn_refused(c: &mut Cluster, id: u64, start: u32, what: &str) {
    c.respawn(id);
    let status = c.wait_exit(id, WAIT).await;
    assert!(!status.success(), "{what} exited with {status}");
    let log = c.log_tail(id, 400);
    let run = log
        .rsplit(&format!("==== e2e: start #{start}"))
        .next()
        .unwrap_or("");
    assert!(
        run.contains("removed from the cluster"),
        "run {start} of member {id} did not log why it stopped:\n{run}"
    );
}

/// A voter whose disk was wiped and that comes back under its old id with `--join` (as an
/// orchestrator's recreated pod would) is refused and stops, saying why; it stays a voter in the
/// membership for an operator to replace, and the others keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_voter_rejoining_under_its_id_is_refused() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    let wiped = c.followers().await[0];
    c.kv(leader)
        .create(create_req("/before-wipe", b"1"))
        .await
        .expect("write");
    c.kill(wiped);
    c.wipe(wiped);
    for flags in [&["--join-as-learner"][..], &[][..]] {
        c.respawn_joining(wiped, flags);
        let status = c.wait_exit(wiped, WAIT).await;
        assert!(!status.success(), "wiped voter exited with {status}");
        let log = c.log_tail(wiped, 200);
        assert!(
            log.contains("lost its") && log.contains("data"),
            "member {wiped} ({flags:?}) did not say why it stopped:\n{log}"
        );
        c.wipe(wiped);
    }
    let admin = client(&c).await;
    let list = admin.member_list().await.expect("list");
    assert_eq!(
        roles(&list).get(&wiped),
        Some(&MemberRole::Voter),
        "{:?}",
        roles(&list)
    );
    c.kv(leader)
        .create(create_req("/after-wipe", b"1"))
        .await
        .expect("the other two keep serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replace_under_write_load_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    let old = c.followers().await[0];
    let admin = client(&c).await;
    let writer = client_for(&c, &[1, 2, 3]).await;

    c.kv(leader)
        .create(create_req("/load", b""))
        .await
        .expect("create /load");
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut acked = Vec::new();
            let started = Instant::now();
            for i in 0..5_000u32 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let path = format!("/load/{i:05}");
                match writer.create(&path, path.clone()).await {
                    Ok(_) => acked.push(path),
                    Err(e) if e.code() == Code::AlreadyExists => acked.push(path),
                    Err(e) => eprintln!("write {path}: {e}"),
                }
            }
            acked
        }
    });

    // The replace adds member 4 before its process exists (so that path is the API's, not
    // `kord --join`'s); once listed, the process starts and catches up.
    c.add_joining(4, &["--join-as-learner"]);
    let new = NewMember {
        id: 4,
        peer_addr: peer_of(&c, 4),
        client_addr: c.client_addr(4).to_string(),
        ..Default::default()
    };
    let replace = tokio::spawn({
        let admin = admin.clone();
        async move {
            admin
                .replace_member(old, new, Duration::from_secs(45))
                .await
        }
    });
    wait_members(&admin, "member 4 added as a learner by the replace", |l| {
        roles(l).get(&4) == Some(&MemberRole::Learner) && l.change_in_progress
    })
    .await;
    c.respawn(4);
    let members = replace.await.expect("replace task").expect("replace");
    let after: BTreeMap<u64, i32> = members.iter().map(|m| (m.id, m.role)).collect();
    assert_eq!(
        after.get(&4),
        Some(&(MemberRole::Voter as i32)),
        "{after:?}"
    );
    assert!(!after.contains_key(&old), "{after:?}");

    // A little more load on the new configuration, then stop.
    let more = client_for(&c, &[4]).await;
    for i in 0..20 {
        more.create(&format!("/after-replace-{i}"), "x")
            .await
            .expect("write through the new member");
    }
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.expect("load task");
    assert!(acked.len() > 10, "the load made progress: {}", acked.len());

    let status = c.wait_exit(old, WAIT).await;
    assert!(!status.success(), "replaced member exited with {status}");

    let statuses = c.wait_converged(WAIT).await;
    assert_same_state(&statuses);
    assert!(statuses.iter().any(|s| s.member_id == 4));
    let mut kv4 = c.kv(4);
    for path in &acked {
        let got = get(&mut kv4, path, LOCAL)
            .await
            .unwrap_or_else(|e| panic!("acknowledged {path} missing on the new member: {e}"));
        assert_eq!(got.data, path.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_are_refused_not_interleaved() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let admin = client(&c).await;
    // A learner nobody runs: it never catches up, so the add holds the change slot until its
    // deadline.
    let nowhere = format!("127.0.0.1:{}", free_ports(1)[0]);
    let slow = tokio::spawn({
        let admin = admin.clone();
        let nowhere = nowhere.clone();
        async move {
            let new = NewMember {
                id: 10,
                peer_addr: nowhere,
                learner_only: true,
                wait_caught_up: true,
                ..Default::default()
            };
            admin.add_member(new, Duration::from_secs(10)).await
        }
    });
    let list = wait_members(&admin, "learner 10 listed", |l| {
        l.members.iter().any(|m| m.id == 10)
    })
    .await;
    assert!(list.change_in_progress, "the add is still waiting");

    let err = admin.promote_member(2, 0, CHANGE).await.unwrap_err();
    assert_refused(
        err,
        Code::FailedPrecondition,
        "membership change in progress",
    );
    let err = admin.remove_member(10, CHANGE).await.unwrap_err();
    assert_refused(
        err,
        Code::FailedPrecondition,
        "membership change in progress",
    );

    let err = slow.await.expect("task").unwrap_err();
    assert_refused(err, Code::DeadlineExceeded, "did not catch up");

    // Now free: a learner that is not caught up is not promoted, and can be removed.
    let err = admin.promote_member(10, 0, CHANGE).await.unwrap_err();
    assert_refused(err, Code::FailedPrecondition, "not caught up");
    admin.remove_member(10, CHANGE).await.expect("remove 10");
    let again = NewMember {
        id: 10,
        peer_addr: nowhere,
        learner_only: true,
        ..Default::default()
    };
    let err = admin.add_member(again, CHANGE).await.unwrap_err();
    assert_refused(err, Code::AlreadyExists, "never reused");
    let list = admin.member_list().await.expect("list");
    assert!(!list.change_in_progress);
    assert_eq!(list.members.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observer_never_votes_and_serves_local_reads_and_watches() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    c.kv(leader)
        .create(create_req("/obs", b"before"))
        .await
        .expect("create");
    c.spawn_joining(5, &["--observer", "--name", "observer-0"]);
    let admin = client(&c).await;
    wait_members(&admin, "member 5 listed as an observer", |l| {
        roles(l).get(&5) == Some(&MemberRole::Observer)
    })
    .await;
    // Every member, the observer included, reports the role.
    let statuses = c.wait_converged(WAIT).await;
    for s in &statuses {
        let m5 = s.members.iter().find(|m| m.id == 5).expect("member 5");
        assert_eq!(
            m5.role,
            MemberRole::Observer as i32,
            "seen by {}",
            s.member_id
        );
        assert_eq!(m5.name, "observer-0");
    }

    let got = get(&mut c.kv(5), "/obs", LOCAL)
        .await
        .expect("local read on the observer");
    assert_eq!(got.data, b"before");

    let mut watch = WatchConn::open(c.channel(5))
        .await
        .expect("watch on observer");
    watch
        .create(WatchCreateRequest {
            path: "/obs".into(),
            ..Default::default()
        })
        .await;
    let created = watch.expect(WAIT, "watch created").await;
    assert!(created.created, "{created:?}");
    c.kv(leader)
        .set(set_req("/obs", b"after", None))
        .await
        .expect("set");
    // Skip progress notifications, if any, up to the event.
    let mut event = watch.expect(WAIT, "the set, seen on the observer").await;
    for _ in 0..10 {
        if !event.events.is_empty() {
            break;
        }
        event = watch.expect(WAIT, "the set, seen on the observer").await;
    }
    assert_eq!(event.events.len(), 1, "{event:?}");
    assert_eq!(event.events[0].path, "/obs");

    let err = admin.promote_member(5, 0, CHANGE).await.unwrap_err();
    assert_refused(err, Code::FailedPrecondition, "observer");
    let list = admin.member_list().await.expect("list");
    assert_eq!(roles(&list).get(&5), Some(&MemberRole::Observer));
    assert!(!list.members.iter().any(|m| m.id == 5 && m.is_leader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_leader_moves_leadership_to_the_chosen_voter() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let admin = client(&c).await;
    // Writes keep flowing during the transfers: their replication must not keep the other
    // voters' leader leases alive (the fence), and none of them may be lost.
    let writer = client(&c).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut acked = Vec::new();
            let started = Instant::now();
            for i in 0..5_000u32 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let path = format!("/t-{i:05}");
                match writer.create(&path, "").await {
                    Ok(_) => acked.push(path),
                    Err(e) if e.code() == Code::AlreadyExists => acked.push(path),
                    Err(e) => eprintln!("write {path}: {e}"),
                }
            }
            acked
        }
    });
    for _round in 0..2 {
        let leader = c.leader().await;
        let target = c.followers().await[1];
        let started = Instant::now();
        let now = admin
            .transfer_leader(target, Duration::from_secs(20))
            .await
            .expect("transfer");
        assert_eq!(now, target);
        eprintln!("transfer {leader} -> {target} took {:?}", started.elapsed());
        assert_eq!(c.leader().await, target);
        c.kv(target)
            .create(create_req(
                &format!("/led-by-{target}-{}", rand::random::<u32>()),
                b"",
            ))
            .await
            .expect("write under the new leader");
    }
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.expect("load task");
    assert!(acked.len() > 10, "the load made progress: {}", acked.len());
    let statuses = c.wait_converged(WAIT).await;
    assert_same_state(&statuses);
    let mut kv = c.kv(c.leader().await);
    for path in &acked {
        get(&mut kv, path, LOCAL)
            .await
            .unwrap_or_else(|e| panic!("acknowledged {path} missing: {e}"));
    }
    // Only a member can lead.
    let err = admin
        .transfer_leader(42, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

async fn kordctl(c: &Cluster, args: &[&str]) -> Output {
    c.kordctl(args, Duration::from_secs(60)).await
}

fn stdout_of(args: &[&str], out: &Output) -> String {
    assert!(
        out.status.success(),
        "kordctl {args:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kordctl_member_commands() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;

    let args = ["member", "list", "-o", "json"];
    let v: Value = serde_json::from_str(&stdout_of(&args, &kordctl(&c, &args).await))
        .expect("member list json");
    assert_eq!(v["leader_id"], leader);
    assert_eq!(v["change_in_progress"], false);
    let members = v["members"].as_array().expect("members array");
    assert_eq!(members.len(), 3);
    for m in members {
        assert_eq!(m["role"], "voter", "{m}");
        assert_eq!(m["is_leader"], m["id"] == leader, "{m}");
    }

    let args = ["member", "list"];
    let text = stdout_of(&args, &kordctl(&c, &args).await);
    assert!(text.starts_with("ID"), "{text}");
    assert!(text.contains(&format!("{leader}*")), "{text}");

    let target = c.followers().await[0];
    let target_s = target.to_string();
    let args = ["member", "transfer-leader", &target_s, "-o", "json"];
    let v: Value =
        serde_json::from_str(&stdout_of(&args, &kordctl(&c, &args).await)).expect("transfer json");
    assert_eq!(v["leader_id"], target);

    // An observer added through the API (no process behind it: it only needs to be listed).
    let nowhere = format!("127.0.0.1:{}", free_ports(1)[0]);
    let args = [
        "member",
        "add",
        "7",
        "--peer-addr",
        &nowhere,
        "--observer",
        "--name",
        "obs",
        "-o",
        "json",
    ];
    let v: Value = serde_json::from_str(&stdout_of(&args, &kordctl(&c, &args).await))
        .expect("member add json");
    let m7 = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["id"] == 7)
        .expect("member 7 listed")
        .clone();
    assert_eq!(m7["role"], "observer", "{m7}");
    assert_eq!(m7["name"], "obs", "{m7}");
    let args = ["member", "promote", "7"];
    let out = kordctl(&c, &args).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("observer"),
        "{out:?}"
    );
    let args = ["member", "remove", "7"];
    let text = stdout_of(&args, &kordctl(&c, &args).await);
    assert!(!text.contains("obs"), "{text}");

    // A refused change exits 1 and says why on stderr.
    let args = ["member", "remove", "99"];
    let out = kordctl(&c, &args).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("member 99 is not a member"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_leader_in_a_five_member_cluster() {
    // Five voters: the target needs two votes besides its own; the old leader's alone is not
    // enough, so fenced followers must grant theirs once their leases ran out.
    let c = Cluster::start(5, ClusterOpts::default()).await;
    let admin = client(&c).await;
    let leader = c.leader().await;
    let target = *c.followers().await.last().expect("a follower");
    let now = admin
        .transfer_leader(target, Duration::from_secs(20))
        .await
        .expect("transfer");
    assert_eq!(now, target);
    assert_eq!(c.leader().await, target, "moved from {leader}");
    c.kv(target)
        .create(create_req("/after-transfer", b""))
        .await
        .expect("write under the new leader");
    let list = admin.member_list().await.expect("list");
    assert_eq!(list.leader_id, target);
    assert!(!list.change_in_progress);
}
