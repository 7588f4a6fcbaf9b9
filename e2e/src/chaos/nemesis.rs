//! Step 2c: the nemesis. One fault at a time, chosen by the seeded RNG from the enabled kinds:
//! kill -9 (leader or random member) and restart, SIGSTOP/SIGCONT longer than the election
//! timeout, network partitions and slow links (with namespaces), leader transfer, and
//! replacing a member whose disk was wiped (needs the membership admin API; switched off with
//! a printed reason while the server answers UNIMPLEMENTED). Every fault is healed before the
//! next, and the loop is bounded in faults and time.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use kord_api::v1::{
    AddMemberRequest, MemberListRequest, MemberRole, RemoveMemberRequest, ReplaceMemberRequest,
    TransferLeaderRequest,
};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tonic::Code;

use super::netns::Network;
use crate::cluster::Cluster;

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    KillLeader,
    KillRandom,
    PauseLeader,
    PauseRandom,
    /// The leader alone on one side.
    PartitionLeader,
    /// A random minority against the majority.
    PartitionHalves,
    SlowLink,
    TransferLeader,
    /// Kill a follower, wipe its disk, remove it, and add an empty member with a new id.
    ReplaceWiped,
    /// Migrate a follower's seat to a new member (ReplaceMember: learner, catch-up, swap).
    ReplaceMember,
}

impl Fault {
    pub const ALL: [Fault; 10] = [
        Fault::KillLeader,
        Fault::KillRandom,
        Fault::PauseLeader,
        Fault::PauseRandom,
        Fault::PartitionLeader,
        Fault::PartitionHalves,
        Fault::SlowLink,
        Fault::TransferLeader,
        Fault::ReplaceWiped,
        Fault::ReplaceMember,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillRandom => "kill-random",
            Fault::PauseLeader => "pause-leader",
            Fault::PauseRandom => "pause-random",
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionHalves => "partition-halves",
            Fault::SlowLink => "slow-link",
            Fault::TransferLeader => "transfer-leader",
            Fault::ReplaceWiped => "replace-wiped",
            Fault::ReplaceMember => "replace-member",
        }
    }

    pub fn needs_network(self) -> bool {
        matches!(
            self,
            Fault::PartitionLeader | Fault::PartitionHalves | Fault::SlowLink
        )
    }

    pub fn needs_membership_api(self) -> bool {
        matches!(
            self,
            Fault::TransferLeader | Fault::ReplaceWiped | Fault::ReplaceMember
        )
    }

    /// Parses a comma-separated list; "all" names every kind.
    pub fn parse_list(list: &str) -> Result<Vec<Fault>, String> {
        let mut out = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "all" {
                out.extend(Fault::ALL);
            } else {
                out.push(item.parse()?);
            }
        }
        out.dedup();
        Ok(out)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fault {s:?}; known: all, {}", names.join(", "))
            })
    }
}

/// How the nemesis runs.
#[derive(Debug, Clone)]
pub struct NemesisConfig {
    pub seed: u64,
    pub faults: Vec<Fault>,
    pub duration: Duration,
    pub max_faults: u32,
    pub election_timeout: Duration,
}

/// What the nemesis did and any liveness failure it met.
#[derive(Debug, Default, Clone)]
pub struct NemesisReport {
    pub log: Vec<String>,
    pub faults: u32,
    pub problems: Vec<String>,
}

/// What must be undone after the hold.
enum Heal {
    Restart(u64),
    Resume(u64),
    Network,
    Nothing,
}

/// Asks whether the server implements the membership admin API (MemberList as the probe).
pub async fn membership_api_available(cluster: &Cluster) -> Result<(), String> {
    let Ok(leader) = cluster.agreed_leader().await else {
        return Err("no leader to ask".into());
    };
    let mut admin = cluster.cluster_client(leader);
    let call = admin.member_list(MemberListRequest {});
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) if s.code() == Code::Unimplemented => Err(format!(
            "the server answers UNIMPLEMENTED for MemberList ({})",
            s.message()
        )),
        Ok(Err(s)) => Err(format!("MemberList failed: {:?} {}", s.code(), s.message())),
        Err(_) => Err("MemberList timed out".into()),
    }
}

const LEADER_WAIT: Duration = Duration::from_secs(30);

/// Waits (bounded) for all running members to agree on a running leader.
async fn await_leader(cluster: &Cluster, within: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + within;
    loop {
        match cluster.agreed_leader().await {
            Ok(l) => return Ok(l),
            Err(why) if Instant::now() >= deadline => return Err(why),
            Err(_) => tokio::time::sleep(crate::wait::POLL_INTERVAL).await,
        }
    }
}

/// Runs faults until `cfg.duration` or `cfg.max_faults`, healing each before the next and
/// everything before returning. `net` is `None` when namespaces are unavailable.
pub async fn run(
    cluster: &mut Cluster,
    mut net: Option<&mut Network>,
    cfg: &NemesisConfig,
    t0: Instant,
) -> NemesisReport {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x4E4D_4553_4953);
    let mut report = NemesisReport::default();
    let until = Instant::now() + cfg.duration;
    // Ids are never reused: new members count up from the largest one.
    let mut next_id = cluster.ids().into_iter().max().unwrap_or(0) + 1;
    // The clients were given these members' addresses, as a static endpoint list (like a
    // ZooKeeper connect string): replacing all of them would cut every client off for good,
    // which tests the harness, not Kord. The last of them is never replaced.
    let known = cluster.ids();
    let stamp = |t0: Instant| format!("{:7.3}s", t0.elapsed().as_secs_f64());
    while report.faults < cfg.max_faults && Instant::now() < until && !cfg.faults.is_empty() {
        // Quiet time between faults: part of the schedule, not synchronisation.
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..2500))).await;
        if Instant::now() >= until {
            break;
        }
        let fault = *cfg.faults.choose(&mut rng).expect("non-empty");
        let leader = cluster.agreed_leader().await.ok();
        let running: Vec<u64> = cluster.live_ids();
        let random = *running.choose(&mut rng).expect("a running member");
        let target_leader = leader.unwrap_or(random);
        let followers: Vec<u64> = running
            .iter()
            .copied()
            .filter(|&i| Some(i) != leader)
            .collect();
        let hold = Duration::from_millis(rng.random_range(1500..4000));
        let (what, heal) = match fault {
            Fault::KillLeader | Fault::KillRandom => {
                let id = if fault == Fault::KillLeader {
                    target_leader
                } else {
                    random
                };
                cluster.kill(id);
                (format!("kill -9 member {id}"), Heal::Restart(id))
            }
            Fault::PauseLeader | Fault::PauseRandom => {
                let id = if fault == Fault::PauseLeader {
                    target_leader
                } else {
                    random
                };
                cluster.pause(id);
                // Longer than the election timeout, so the others elect without it.
                let pause = cfg.election_timeout * 2 + hold;
                (
                    format!("SIGSTOP member {id} for {pause:?}"),
                    Heal::Resume(id),
                )
            }
            Fault::PartitionLeader | Fault::PartitionHalves | Fault::SlowLink => {
                let Some(net) = net.as_deref_mut() else {
                    continue;
                };
                let slot = |id: u64| usize::try_from(id).unwrap_or(usize::MAX);
                let result = match fault {
                    Fault::PartitionLeader => {
                        let others: Vec<usize> = running
                            .iter()
                            .filter(|&&i| i != target_leader)
                            .map(|&i| slot(i))
                            .collect();
                        net.partition(&[slot(target_leader)], &others)
                            .map(|()| format!("partition leader {target_leader} from {others:?}"))
                    }
                    Fault::PartitionHalves => {
                        let mut ids = running.clone();
                        let minority = ids.len().saturating_sub(1) / 2;
                        let mut side_a = Vec::new();
                        for _ in 0..minority.max(1) {
                            let i = rng.random_range(0..ids.len());
                            side_a.push(slot(ids.remove(i)));
                        }
                        let side_b: Vec<usize> = ids.into_iter().map(slot).collect();
                        net.partition(&side_a, &side_b)
                            .map(|()| format!("partition {side_a:?} | {side_b:?}"))
                    }
                    _ => net
                        .slow(slot(random))
                        .map(|kind| format!("slow link of member {random} ({kind})")),
                };
                match result {
                    Ok(what) => (what, Heal::Network),
                    Err(e) => {
                        report
                            .problems
                            .push(format!("nemesis could not break the network: {e}"));
                        let _ = net.heal();
                        continue;
                    }
                }
            }
            Fault::TransferLeader => {
                let Some(&to) = followers.choose(&mut rng) else {
                    continue;
                };
                let mut admin = cluster.cluster_client(target_leader);
                let request =
                    with_deadline(TransferLeaderRequest { to_id: to }, Duration::from_secs(15));
                // A refusal (e.g. the target lags) is allowed; only safety is checked.
                let outcome = match admin.transfer_leader(request).await {
                    Ok(r) => format!("now led by {}", r.into_inner().leader_id),
                    Err(s) => format!("refused: {:?} {}", s.code(), s.message()),
                };
                (
                    format!("transfer leadership {target_leader} -> {to}: {outcome}"),
                    Heal::Nothing,
                )
            }
            Fault::ReplaceWiped | Fault::ReplaceMember => {
                let members = cluster.ids();
                let known_left = known.iter().filter(|id| members.contains(id)).count();
                let replaceable: Vec<u64> = followers
                    .iter()
                    .copied()
                    .filter(|id| known_left > 1 || !known.contains(id))
                    .collect();
                let Some(&old) = replaceable.choose(&mut rng) else {
                    continue;
                };
                let new = next_id;
                if net
                    .as_deref()
                    .is_some_and(|n| usize::try_from(new).unwrap_or(usize::MAX) > n.slots())
                {
                    // Every new member needs a namespace of its own.
                    report.log.push(format!(
                        "{} {fault}: skipped, no network slot for member {new}",
                        stamp(t0)
                    ));
                    continue;
                }
                next_id += 1;
                let result = if fault == Fault::ReplaceWiped {
                    replace_wiped(cluster, target_leader, old, new).await
                } else {
                    replace_member(cluster, target_leader, old, new).await
                };
                match result {
                    Ok(what) => (what, Heal::Nothing),
                    Err(e) => {
                        report
                            .problems
                            .push(format!("{fault} of member {old}: {e}"));
                        (format!("FAILED: {e}"), Heal::Nothing)
                    }
                }
            }
        };
        report.faults += 1;
        report.log.push(format!("{} {fault}: {what}", stamp(t0)));
        let hold = match heal {
            Heal::Resume(_) => cfg.election_timeout * 2 + hold,
            _ => hold,
        };
        tokio::time::sleep(hold).await;
        let healed = match heal {
            Heal::Restart(id) => {
                cluster.restart(id).await;
                format!("restarted member {id}")
            }
            Heal::Resume(id) => {
                cluster.resume(id);
                format!("SIGCONT member {id}")
            }
            Heal::Network => match net.as_deref_mut().map(|n| n.heal()) {
                Some(Err(e)) => {
                    report
                        .problems
                        .push(format!("could not heal the network: {e}"));
                    "heal failed".into()
                }
                _ => "healed the network".into(),
            },
            Heal::Nothing => continue,
        };
        report.log.push(format!("{} {healed}", stamp(t0)));
        if let Err(why) = await_leader(cluster, LEADER_WAIT).await {
            report.problems.push(format!(
                "no leader {LEADER_WAIT:?} after healing {fault}: {why}"
            ));
            break;
        }
    }
    report
}

/// A membership request with a deadline the server sees (`grpc-timeout`) and the caller keeps.
fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// Waits (bounded) until member `leader` lists `id` in the given role.
async fn await_role(
    cluster: &Cluster,
    leader: u64,
    id: u64,
    role: MemberRole,
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut admin = cluster.cluster_client(leader);
        match admin
            .member_list(with_deadline(MemberListRequest {}, Duration::from_secs(5)))
            .await
        {
            Ok(r) => {
                let members = r.into_inner().members;
                if members.iter().any(|m| m.id == id && m.role == role as i32) {
                    return Ok(());
                }
                last = format!(
                    "{:?}",
                    members.iter().map(|m| (m.id, m.role)).collect::<Vec<_>>()
                );
            }
            Err(s) => last = format!("{:?} {}", s.code(), s.message()),
        }
        tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
    }
    Err(format!(
        "member {id} not {role:?} within {within:?}; last (id, role): {last}"
    ))
}

const MEMBERSHIP_DEADLINE: Duration = Duration::from_secs(60);
/// How long a replaced member may take to stop by itself.
const OLD_MEMBER_EXIT: Duration = Duration::from_secs(30);

/// Kills follower `old`, wipes its disk, removes it through the leader, and starts an empty
/// member `new` that joins (as a voter) through a live member.
async fn replace_wiped(
    cluster: &mut Cluster,
    leader: u64,
    old: u64,
    new: u64,
) -> Result<String, String> {
    cluster.kill(old);
    cluster.wipe(old);
    let mut admin = cluster.cluster_client(leader);
    let removed = admin
        .remove_member(with_deadline(
            RemoveMemberRequest { id: old },
            Duration::from_secs(20),
        ))
        .await;
    // Removed or not, the wiped member cannot come back under its id.
    cluster.forget(old);
    if let Err(s) = removed {
        // A refusal is the server's right (e.g. leadership moved); the cluster carries on with
        // a dead voter until a later fault replaces it. Only safety is judged.
        return Ok(format!(
            "wiped member {old}; RemoveMember refused: {:?} {}",
            s.code(),
            s.message()
        ));
    }
    cluster.spawn_joining(new, &[]);
    await_role(cluster, leader, new, MemberRole::Voter, MEMBERSHIP_DEADLINE).await?;
    Ok(format!(
        "wiped and removed member {old}; empty member {new} joined as a voter"
    ))
}

/// Starts member `new` as a learner and has the cluster migrate `old`'s seat to it; the old
/// member must then stop by itself (anti-rejoin guard).
async fn replace_member(
    cluster: &mut Cluster,
    leader: u64,
    old: u64,
    new: u64,
) -> Result<String, String> {
    cluster.spawn_joining(new, &["--join-as-learner"]);
    if let Err(e) = await_role(
        cluster,
        leader,
        new,
        MemberRole::Learner,
        MEMBERSHIP_DEADLINE,
    )
    .await
    {
        cluster.forget(new);
        return Err(e);
    }
    let request = ReplaceMemberRequest {
        old_id: old,
        new_member: Some(AddMemberRequest {
            id: new,
            peer_addr: cluster.peer_addr(new).to_string(),
            client_addr: cluster.client_addr(new).to_string(),
            ..Default::default()
        }),
    };
    let mut admin = cluster.cluster_client(leader);
    if let Err(s) = admin
        .replace_member(with_deadline(request, MEMBERSHIP_DEADLINE))
        .await
    {
        // Refusals are allowed (e.g. `old` became the leader meanwhile). The learner stays a
        // (harmless) non-voter; stop its process so nothing else uses it.
        cluster.forget(new);
        return Ok(format!(
            "ReplaceMember {old} -> {new} refused: {:?} {}",
            s.code(),
            s.message()
        ));
    }
    // The replaced member must notice and stop by itself (bounded wait, then killed).
    let deadline = Instant::now() + OLD_MEMBER_EXIT;
    let status = loop {
        if let Some(status) = cluster.exited(old) {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
    };
    cluster.forget(old);
    match status {
        Some(status) => Ok(format!("migrated member {old}'s seat to {new}; {old} stopped by itself ({status})")),
        None => Err(format!(
            "migrated member {old}'s seat to {new}, but {old} was still running {OLD_MEMBER_EXIT:?} later \
             (killed); see its log for \"removed from the cluster; stopping\""
        )),
    }
}
