//! Property tests of `plan::plan` against a simulated world: the plan's whole input space
//! (pods, volumes, Raft membership and health, clock, spec) evolves by the planned steps, by
//! partially applied steps (the operator crashed between two API calls) and by faults (pods
//! evicted or stuck on a dead node, volumes lost, members failing and recovering, elections).
//!
//! Checked on every planned step: majority of healthy voters kept, no pod or volume of a Raft
//! member deleted (a voter's pod only restarted on its own volume), ids never reused, nothing
//! destructive without quorum, the leader never removed in place. After the faults stop, the
//! plan converges to the spec within a bounded number of steps.

use std::collections::{BTreeMap, BTreeSet};

use kord_operator::plan::{
    majority, plan, Desired, Kind, Member, MemberId, Millis, Observed, Plan, Pod, RaftRole,
    RaftView, Step, Wait, CAUGHT_UP_LAG,
};
use proptest::prelude::*;

const REPLACE_AFTER: Millis = 120_000;
const JOIN_TIMEOUT: Millis = 600_000;
const TICK: Millis = 30_000;

#[derive(Debug, Clone)]
struct SimPod {
    image: String,
    ready: bool,
    /// On a node that is gone: never ready again.
    stuck: bool,
    since: Millis,
    /// Started with `--initial-cluster` (forms the cluster when first ready).
    bootstrap: bool,
}

#[derive(Debug, Clone)]
struct Meta {
    kind: Kind,
    retired: bool,
    created: Millis,
}

#[derive(Debug, Clone)]
struct World {
    desired: Desired,
    now: Millis,
    next_id: MemberId,
    bootstrapped: bool,
    pods: BTreeMap<MemberId, SimPod>,
    volumes: BTreeSet<MemberId>,
    meta: BTreeMap<MemberId, Meta>,
    raft: BTreeMap<MemberId, (RaftRole, u64)>,
    leader: Option<MemberId>,
    removed: BTreeSet<MemberId>,
    used: BTreeSet<MemberId>,
    formed: bool,
}

/// How much of a planned step got done before the (simulated) operator crashed.
#[derive(Debug, Clone, Copy)]
enum Crash {
    None,
    Before,
    /// Only the first of the step's API calls (status counter, or counter and volume).
    Partial(u8),
}

#[derive(Debug, Clone)]
enum Op {
    Plan(Crash),
    Ready(u8),
    Join(u8),
    CatchUp(u8),
    Fail(u8),
    Stuck(u8),
    Evict(u8),
    LoseVolume(u8),
    Elect,
    Tick(Millis),
    Spec {
        voters: usize,
        observers: usize,
        image: u8,
    },
}

fn image(v: u8) -> String {
    format!("kord:{v}")
}

impl World {
    fn new(voters: usize, observers: usize, ephemeral: bool) -> World {
        World {
            desired: Desired {
                voters,
                observers,
                revision: image(0),
                ephemeral,
                replace_after: REPLACE_AFTER,
                join_timeout: JOIN_TIMEOUT,
            },
            now: 1_000_000,
            next_id: 1,
            bootstrapped: false,
            pods: BTreeMap::new(),
            volumes: BTreeSet::new(),
            meta: BTreeMap::new(),
            raft: BTreeMap::new(),
            leader: None,
            removed: BTreeSet::new(),
            used: BTreeSet::new(),
            formed: false,
        }
    }

    fn data_intact(&self, id: MemberId) -> bool {
        if self.desired.ephemeral {
            self.pods.contains_key(&id)
        } else {
            self.volumes.contains(&id)
        }
    }

    fn healthy(&self, id: MemberId) -> bool {
        self.pods.get(&id).is_some_and(|p| p.ready)
    }

    fn voters(&self) -> Vec<MemberId> {
        self.raft
            .iter()
            .filter(|(_, (r, _))| *r == RaftRole::Voter)
            .map(|(&id, _)| id)
            .collect()
    }

    fn ids(&self) -> BTreeSet<MemberId> {
        let mut ids: BTreeSet<MemberId> = self.pods.keys().copied().collect();
        ids.extend(self.volumes.iter().copied());
        ids.extend(self.raft.keys().copied());
        ids
    }

    /// What `observe.rs` would assemble from the API server and the leader.
    fn observe(&mut self) -> Observed {
        let view = self
            .leader
            .filter(|&l| self.healthy(l))
            .map(|leader| RaftView {
                leader,
                change_in_progress: false,
            });
        if view.is_some() {
            self.bootstrapped = true;
        }
        let mut members = BTreeMap::new();
        for id in self.ids() {
            let meta = self.meta.get(&id);
            let has_objects = self.pods.contains_key(&id) || self.volumes.contains(&id);
            let (raft, lag) = match self.raft.get(&id) {
                Some(&(role, lag)) => (Some(role), lag),
                None => (None, 0),
            };
            members.insert(
                id,
                Member {
                    kind: meta.map_or(Kind::Voter, |m| m.kind),
                    retired: has_objects && meta.is_some_and(|m| m.retired),
                    pod: self.pods.get(&id).map(|p| Pod {
                        revision: p.image.clone(),
                    }),
                    volume: self.data_intact(id),
                    raft,
                    lag,
                    healthy: self.healthy(id),
                    unhealthy_since: self
                        .pods
                        .get(&id)
                        .map(|p| p.since)
                        .or(meta.map(|m| m.created))
                        .unwrap_or(self.now),
                    created_at: meta.map_or(self.now, |m| m.created),
                },
            );
        }
        let next_id = self
            .ids()
            .last()
            .map_or(self.next_id, |&max| self.next_id.max(max + 1));
        Observed {
            now: self.now,
            next_id,
            bootstrapped: self.bootstrapped,
            members,
            raft: view,
        }
    }

    fn new_pod(&self, bootstrap: bool) -> SimPod {
        SimPod {
            image: self.desired.revision.clone(),
            ready: false,
            stuck: false,
            since: self.now,
            bootstrap,
        }
    }

    fn create(&mut self, id: MemberId, kind: Kind, bootstrap: bool, crash: Crash) {
        self.next_id = self.next_id.max(id + 1);
        self.used.insert(id);
        if matches!(crash, Crash::Partial(0)) {
            return;
        }
        self.meta.insert(
            id,
            Meta {
                kind,
                retired: false,
                created: self.now,
            },
        );
        if !self.desired.ephemeral {
            self.volumes.insert(id);
        }
        if matches!(crash, Crash::Partial(_)) {
            return;
        }
        let pod = self.new_pod(bootstrap);
        self.pods.insert(id, pod);
    }

    /// Applies a planned step as the API server and the Kord leader would.
    fn apply(&mut self, step: &Step, crash: Crash) {
        if matches!(crash, Crash::Before) {
            return;
        }
        match *step {
            Step::Bootstrap { id } => self.create(id, Kind::Voter, true, crash),
            Step::CreateMember { id, kind } => self.create(id, kind, false, crash),
            Step::CreatePod { id, bootstrap } => {
                let pod = self.new_pod(bootstrap);
                self.pods.insert(id, pod);
            }
            Step::Retire { id, .. } => {
                if let Some(m) = self.meta.get_mut(&id) {
                    m.retired = true;
                } else {
                    self.meta.insert(
                        id,
                        Meta {
                            kind: Kind::Voter,
                            retired: true,
                            created: self.now,
                        },
                    );
                }
            }
            Step::Promote { id } => {
                let is_voter_kind = self.meta.get(&id).is_none_or(|m| m.kind == Kind::Voter);
                if let Some(entry) = self.raft.get_mut(&id) {
                    if entry.0 == RaftRole::Learner && entry.1 <= CAUGHT_UP_LAG && is_voter_kind {
                        entry.0 = RaftRole::Voter;
                    }
                }
            }
            Step::TransferLeader { to, .. } => {
                if self.raft.get(&to).is_some_and(|e| e.0 == RaftRole::Voter) && self.healthy(to) {
                    self.leader = Some(to);
                }
            }
            Step::RemoveMember { id } => {
                self.raft.remove(&id);
                self.removed.insert(id);
                if self.leader == Some(id) {
                    self.leader = None;
                }
            }
            Step::RestartPod { id } | Step::DeletePod { id } => {
                self.pods.remove(&id);
            }
            Step::DeleteVolume { id } => {
                self.volumes.remove(&id);
            }
        }
    }

    fn pick(&self, i: u8) -> Option<MemberId> {
        let ids: Vec<MemberId> = self.ids().into_iter().collect();
        (!ids.is_empty()).then(|| ids[i as usize % ids.len()])
    }

    /// Voters whose data is gone or whose pod is stuck: they never come back by themselves.
    fn impaired_voters(&self) -> usize {
        self.voters()
            .into_iter()
            .filter(|&v| !self.data_intact(v) || self.pods.get(&v).is_some_and(|p| p.stuck))
            .count()
    }

    /// Faults that would lose quorum for good are not applied: no operator can converge then
    /// (that is the manual recovery in the README).
    /// A first member stuck before the cluster was ever seen formed is left to a human too
    /// (`plan` waits in Bootstrapping rather than guess whether it holds acknowledged data).
    fn fault_allowed(&self, id: MemberId, destroys: impl Fn(&mut World)) -> bool {
        if !self.bootstrapped && self.pods.get(&id).is_some_and(|p| p.bootstrap) {
            let mut after = self.clone();
            destroys(&mut after);
            if after.pods.get(&id).is_some_and(|p| p.stuck) {
                return false;
            }
        }
        if !self.raft.contains_key(&id) {
            return true;
        }
        let mut after = self.clone();
        destroys(&mut after);
        let voters = after.voters().len();
        voters == 0 || voters - after.impaired_voters() >= majority(voters)
    }

    fn ready(&mut self, id: MemberId) {
        let intact = self.data_intact(id);
        let removed = self.removed.contains(&id);
        let now = self.now;
        let Some(pod) = self.pods.get_mut(&id) else {
            return;
        };
        if pod.stuck || !intact || removed || pod.ready {
            return;
        }
        pod.ready = true;
        pod.since = now;
        if pod.bootstrap && !self.formed {
            self.formed = true;
            self.raft.insert(id, (RaftRole::Voter, 0));
            self.leader = Some(id);
        }
    }

    fn join(&mut self, id: MemberId) {
        let Some(leader) = self.leader else { return };
        if !self.healthy(leader) || !self.healthy(id) || self.raft.contains_key(&id) {
            return;
        }
        if self.removed.contains(&id) || self.pods.get(&id).is_none_or(|p| p.bootstrap) {
            return;
        }
        self.raft.insert(id, (RaftRole::Learner, 50_000));
    }

    fn elect(&mut self) {
        if self.leader.is_some_and(|l| self.healthy(l)) {
            return;
        }
        let voters = self.voters();
        let healthy: Vec<MemberId> = voters
            .iter()
            .copied()
            .filter(|&v| self.healthy(v))
            .collect();
        if !voters.is_empty() && healthy.len() >= majority(voters.len()) {
            self.leader = healthy.first().copied();
        }
    }

    fn env(&mut self, op: &Op) {
        match *op {
            Op::Plan(_) => {}
            Op::Ready(i) => {
                if let Some(id) = self.pick(i) {
                    self.ready(id);
                }
            }
            Op::Join(i) => {
                if let Some(id) = self.pick(i) {
                    self.join(id);
                }
            }
            Op::CatchUp(i) => {
                if let Some(id) = self.pick(i) {
                    if let Some(e) = self.raft.get_mut(&id) {
                        e.1 = 0;
                    }
                }
            }
            Op::Fail(i) => {
                if let Some(id) = self.pick(i) {
                    let now = self.now;
                    if let Some(p) = self.pods.get_mut(&id) {
                        if p.ready {
                            p.ready = false;
                            p.since = now;
                        }
                    }
                }
            }
            Op::Stuck(i) => {
                if let Some(id) = self.pick(i) {
                    let stick = |w: &mut World| {
                        if let Some(p) = w.pods.get_mut(&id) {
                            p.stuck = true;
                            p.ready = false;
                        }
                    };
                    if self.fault_allowed(id, stick) {
                        let now = self.now;
                        if let Some(p) = self.pods.get_mut(&id) {
                            if p.ready {
                                p.since = now;
                            }
                        }
                        stick(self);
                    }
                }
            }
            Op::Evict(i) => {
                if let Some(id) = self.pick(i) {
                    let evict = |w: &mut World| {
                        w.pods.remove(&id);
                    };
                    if self.fault_allowed(id, evict) {
                        evict(self);
                    }
                }
            }
            Op::LoseVolume(i) => {
                if let Some(id) = self.pick(i) {
                    let lose = |w: &mut World| {
                        w.volumes.remove(&id);
                    };
                    if self.fault_allowed(id, lose) {
                        lose(self);
                    }
                }
            }
            Op::Elect => self.elect(),
            Op::Tick(ms) => self.now += ms,
            Op::Spec {
                voters,
                observers,
                image: v,
            } => {
                self.desired.voters = voters;
                self.desired.observers = observers;
                self.desired.revision = image(v);
            }
        }
    }

    /// Everything recovers that can: pods start, members join and catch up, a leader is elected.
    fn settle(&mut self) {
        for id in self.ids() {
            self.ready(id);
        }
        self.elect();
        for id in self.ids() {
            self.join(id);
            if let Some(e) = self.raft.get_mut(&id) {
                e.1 = 0;
            }
        }
        self.now += TICK;
    }

    /// One reconcile: observe, plan, check the step's safety, apply it (maybe partially).
    fn reconcile(&mut self, crash: Crash) -> Result<Plan, TestCaseError> {
        let observed = self.observe();
        let planned = plan(&self.desired, &observed);
        if let Plan::Act(step) = &planned {
            self.check_safe(&observed, step)?;
            self.apply(step, crash);
        }
        Ok(planned)
    }

    fn check_safe(&self, o: &Observed, step: &Step) -> Result<(), TestCaseError> {
        let voters: BTreeSet<MemberId> = self.voters().into_iter().collect();
        let healthy: BTreeSet<MemberId> = voters
            .iter()
            .copied()
            .filter(|&v| o.members[&v].healthy)
            .collect();
        let quorate = o.raft.is_some() && healthy.len() >= majority(voters.len());
        let constructive = matches!(step, Step::CreatePod { .. })
            || (!o.bootstrapped
                && o.raft.is_none()
                && matches!(step, Step::Bootstrap { .. } | Step::DeletePod { .. }));
        prop_assert!(
            quorate || constructive,
            "{step:?} planned without a quorum of healthy voters: {o:?}"
        );
        let (mut v2, mut h2) = (voters.clone(), healthy.clone());
        match *step {
            Step::RemoveMember { id } => {
                prop_assert_ne!(Some(id), self.leader, "removing the leader in place");
                v2.remove(&id);
                h2.remove(&id);
            }
            Step::RestartPod { id } => {
                prop_assert!(
                    self.volumes.contains(&id) && !self.desired.ephemeral,
                    "restart of member {} without a volume to come back on",
                    id
                );
                h2.remove(&id);
            }
            Step::DeletePod { id } | Step::DeleteVolume { id } => {
                prop_assert!(
                    !self.raft.contains_key(&id),
                    "{step:?} of a Raft member: {:?}",
                    self.raft
                );
            }
            Step::Promote { id } => {
                v2.insert(id);
                if o.members[&id].healthy {
                    h2.insert(id);
                }
            }
            Step::Bootstrap { id } | Step::CreateMember { id, .. } => {
                prop_assert!(!self.used.contains(&id), "id {} reused", id);
                if matches!(step, Step::Bootstrap { .. }) {
                    prop_assert!(!self.formed, "a second bootstrap of a formed cluster");
                }
            }
            _ => {}
        }
        if quorate && !v2.is_empty() {
            prop_assert!(
                h2.len() >= majority(v2.len()),
                "{step:?} leaves {} healthy of {} voters",
                h2.len(),
                v2.len()
            );
        }
        Ok(())
    }

    fn converged(&self) -> Result<(), String> {
        let voters = self.voters();
        if voters.len() != self.desired.voters {
            return Err(format!(
                "{} voters, want {}",
                voters.len(),
                self.desired.voters
            ));
        }
        if !voters.iter().all(|&v| self.healthy(v)) {
            return Err("an unhealthy voter".into());
        }
        let observers = self
            .raft
            .iter()
            .filter(|(_, (r, _))| *r == RaftRole::Learner)
            .count();
        if observers != self.desired.observers {
            return Err(format!(
                "{observers} observers, want {}",
                self.desired.observers
            ));
        }
        for id in self.ids() {
            if !self.raft.contains_key(&id) {
                return Err(format!("leftover objects of non-member {id}"));
            }
            let pod = self
                .pods
                .get(&id)
                .ok_or(format!("member {id} has no pod"))?;
            if pod.image != self.desired.revision {
                return Err(format!("member {id} runs {}", pod.image));
            }
            if !self.data_intact(id) {
                return Err(format!("member {id} lost its data"));
            }
        }
        Ok(())
    }
}

fn crash() -> impl Strategy<Value = Crash> {
    prop_oneof![
        6 => Just(Crash::None),
        1 => Just(Crash::Before),
        1 => (0u8..2).prop_map(Crash::Partial),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let id = any::<u8>();
    prop_oneof![
        12 => crash().prop_map(Op::Plan),
        4 => id.prop_map(Op::Ready),
        3 => id.prop_map(Op::Join),
        3 => id.prop_map(Op::CatchUp),
        4 => id.prop_map(Op::Fail),
        1 => id.prop_map(Op::Stuck),
        1 => id.prop_map(Op::Evict),
        1 => id.prop_map(Op::LoseVolume),
        2 => Just(Op::Elect),
        2 => (1_000u64..200_000).prop_map(Op::Tick),
        2 => (1usize..=7, 0usize..=2, 0u8..3).prop_map(|(voters, observers, image)| Op::Spec {
            voters,
            observers,
            image
        }),
    ]
}

/// Runs `ops` (checking every planned step), then lets the world settle and checks the plan
/// reaches the spec within a bounded number of reconciles.
fn run(voters: usize, ephemeral: bool, formed: bool, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut world = World::new(voters, 0, ephemeral);
    if formed {
        // Start from a running cluster, so the random history explores its changes and faults
        // rather than mostly its bootstrap.
        calm(&mut world)?;
    }
    for op in ops {
        match op {
            Op::Plan(crash) => {
                world.reconcile(*crash)?;
            }
            other => world.env(other),
        }
    }
    calm(&mut world)
}

fn calm(world: &mut World) -> Result<(), TestCaseError> {
    // Calm: no more faults or spec changes. Bounded: 7 voters, 2 observers, replacements and a
    // rolling update need well under 400 reconciles.
    for _ in 0..400 {
        let planned = world.reconcile(Crash::None)?;
        if planned == Plan::Converged {
            let verdict = world.converged();
            prop_assert!(
                verdict.is_ok(),
                "converged plan but {:?}: {:?}",
                verdict,
                world
            );
            return Ok(());
        }
        world.settle();
    }
    let desired = world.desired.clone();
    let last = plan(&desired, &world.observe());
    prop_assert!(
        false,
        "no convergence; last plan {:?}; world {:?}",
        last,
        world
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn converges_safely_on_volumes(voters in 1usize..=7, formed in any::<bool>(), ops in prop::collection::vec(op(), 0..120)) {
        run(voters, false, formed, &ops)?;
    }

    #[test]
    fn converges_safely_on_ephemeral_storage(voters in 1usize..=5, formed in any::<bool>(), ops in prop::collection::vec(op(), 0..120)) {
        run(voters, true, formed, &ops)?;
    }
}

/// Re-planning from the state a step left (applied, half-applied or not at all) repeats nothing
/// harmful: the replanned step passes the same safety checks, and ids are never reused.
#[test]
fn crash_between_steps_replans_safely() {
    let mut world = World::new(3, 1, false);
    for round in 0..200 {
        let before = world.clone();
        let crash = [
            Crash::None,
            Crash::Before,
            Crash::Partial(0),
            Crash::Partial(1),
        ][round % 4];
        let first = world.reconcile(crash).expect("safe step");
        // The same reconcile again right away (as after a crash and restart).
        world.reconcile(Crash::None).expect("safe replanned step");
        if crash_is_noop(crash) {
            let again = plan(&before.desired, &before.clone().observe());
            assert_eq!(again, first, "planning is deterministic");
        }
        world.settle();
    }
    assert_eq!(world.converged(), Ok(()));
}

fn crash_is_noop(crash: Crash) -> bool {
    matches!(crash, Crash::Before)
}

#[test]
fn scale_up_joins_one_learner_at_a_time_then_promotes() {
    let mut world = World::new(1, 0, false);
    let mut steps = Vec::new();
    for _ in 0..100 {
        if let Plan::Act(step) = world.reconcile(Crash::None).expect("safe") {
            steps.push(step);
        }
        if world.converged().is_ok() && world.voters().len() == 1 {
            break;
        }
        world.settle();
    }
    world.desired.voters = 3;
    steps.clear();
    for _ in 0..100 {
        match world.reconcile(Crash::None).expect("safe") {
            Plan::Act(step) => steps.push(step),
            Plan::Converged => break,
            Plan::Wait(_) => {}
        }
        world.settle();
    }
    assert_eq!(world.converged(), Ok(()));
    let kinds: Vec<&str> = steps
        .iter()
        .map(|s| match s {
            Step::CreateMember { .. } => "create",
            Step::Promote { .. } => "promote",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["create", "promote", "create", "promote"],
        "{steps:?}"
    );
}

#[test]
fn quorum_lost_plans_nothing_destructive() {
    let mut world = World::new(3, 0, false);
    for _ in 0..100 {
        if world.reconcile(Crash::None).expect("safe") == Plan::Converged {
            break;
        }
        world.settle();
    }
    assert_eq!(world.converged(), Ok(()));
    // Two of three voters fail for far longer than the grace period.
    let voters = world.voters();
    for &v in &voters[..2] {
        world.pods.get_mut(&v).expect("pod").ready = false;
    }
    world.now += 100 * REPLACE_AFTER;
    let planned = world.reconcile(Crash::None).expect("safe");
    assert!(
        matches!(&planned, Plan::Wait(w) if w.degraded()),
        "{planned:?}"
    );
}

/// A retired healthy voter is not removed while the others are barely a majority: removing it
/// would leave one healthy voter of two.
#[test]
fn removal_waits_while_the_rest_is_not_a_healthy_majority() {
    let mut world = World::new(3, 0, false);
    for _ in 0..100 {
        if world.reconcile(Crash::None).expect("safe") == Plan::Converged {
            break;
        }
        world.settle();
    }
    assert_eq!(world.converged(), Ok(()));
    world.desired.voters = 2;
    let retired = match world.reconcile(Crash::None).expect("safe") {
        Plan::Act(Step::Retire { id, .. }) => id,
        other => panic!("expected a retirement, got {other:?}"),
    };
    let other = world
        .voters()
        .into_iter()
        .find(|&v| v != retired && Some(v) != world.leader)
        .expect("a follower that stays");
    let now = world.now;
    let pod = world.pods.get_mut(&other).expect("pod");
    pod.ready = false;
    pod.since = now;
    let planned = world.reconcile(Crash::None).expect("safe");
    assert!(
        matches!(planned, Plan::Wait(Wait::QuorumAtRisk { id }) if id == retired),
        "{planned:?}"
    );
    world.ready(other);
    let planned = world.reconcile(Crash::None).expect("safe");
    assert_eq!(planned, Plan::Act(Step::RemoveMember { id: retired }));
}
