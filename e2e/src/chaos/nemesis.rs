//! Step 2c: the nemesis. One fault at a time, chosen by the seeded RNG from the enabled kinds:
//! kill -9 (leader or random member) and restart, SIGSTOP/SIGCONT longer than the election
//! timeout, network partitions and slow links (with namespaces), leader transfer, and
//! replacing a member whose disk was wiped (needs the membership admin API; switched off with
//! a printed reason while the server answers UNIMPLEMENTED). Every fault is healed before the
//! next, and the loop is bounded in faults and time.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use kord_api::v1::{MemberListRequest, RemoveMemberRequest, TransferLeaderRequest};
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
}

impl Fault {
    pub const ALL: [Fault; 9] = [
        Fault::KillLeader,
        Fault::KillRandom,
        Fault::PauseLeader,
        Fault::PauseRandom,
        Fault::PartitionLeader,
        Fault::PartitionHalves,
        Fault::SlowLink,
        Fault::TransferLeader,
        Fault::ReplaceWiped,
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
        }
    }

    pub fn needs_network(self) -> bool {
        matches!(
            self,
            Fault::PartitionLeader | Fault::PartitionHalves | Fault::SlowLink
        )
    }

    pub fn needs_membership_api(self) -> bool {
        matches!(self, Fault::TransferLeader | Fault::ReplaceWiped)
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
                let call = admin.transfer_leader(TransferLeaderRequest { to_id: to });
                let outcome = match tokio::time::timeout(Duration::from_secs(15), call).await {
                    Ok(Ok(r)) => format!("now led by {}", r.into_inner().leader_id),
                    Ok(Err(s)) => format!("refused: {:?} {}", s.code(), s.message()),
                    Err(_) => "timed out".into(),
                };
                (
                    format!("transfer leadership {target_leader} -> {to}: {outcome}"),
                    Heal::Nothing,
                )
            }
            Fault::ReplaceWiped => {
                let Some(&old) = followers.choose(&mut rng) else {
                    continue;
                };
                match replace_wiped(cluster, net.as_deref(), target_leader, old).await {
                    Ok(what) => (what, Heal::Nothing),
                    Err(e) => (format!("replace member {old}: {e}"), Heal::Nothing),
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

/// Kills follower `old`, wipes its disk, removes it through the leader, and starts an empty
/// member with a new id that joins through `leader`.
async fn replace_wiped(
    cluster: &mut Cluster,
    net: Option<&Network>,
    leader: u64,
    old: u64,
) -> Result<String, String> {
    if let Some(net) = net {
        // The new member needs a namespace of its own.
        let next = cluster.ids().into_iter().max().unwrap_or(0) + 1;
        if usize::try_from(next).unwrap_or(usize::MAX) > net.slots() {
            return Err(format!("no network slot left for a member {next}"));
        }
    }
    cluster.kill(old);
    cluster.wipe(old);
    let mut admin = cluster.cluster_client(leader);
    let removed = tokio::time::timeout(
        Duration::from_secs(15),
        admin.remove_member(RemoveMemberRequest { id: old }),
    )
    .await;
    match removed {
        Ok(Ok(_)) => {}
        Ok(Err(s)) => {
            // Not removed: bring the (now empty) member back as it was is impossible with the
            // same id, so the cluster carries on one member short until a later replace.
            cluster.forget(old);
            return Err(format!(
                "RemoveMember refused: {:?} {}",
                s.code(),
                s.message()
            ));
        }
        Err(_) => {
            cluster.forget(old);
            return Err("RemoveMember timed out".into());
        }
    }
    cluster.forget(old);
    let new = cluster.spawn_joining(leader, &[]).await;
    Ok(format!(
        "wiped and removed member {old}; member {new} joined empty"
    ))
}
