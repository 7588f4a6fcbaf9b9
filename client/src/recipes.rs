//! ZooKeeper recipes built purely on znodes and watches: a read-write lock and a counting
//! semaphore. Each participant creates an ephemeral sequential node owned by its [`Session`],
//! so a crashed participant's place goes with its session; waiters re-check the queue after
//! whatever they watched fires, since a node may go because its session expired rather than
//! because it finished.

use std::cmp::Ordering;

use crate::{Client, Error, Session};

const ROOT: &str = "/kord";
const RWLOCK_DIR: &str = "/kord/rwlocks";
const SEMAPHORE_DIR: &str = "/kord/semaphores";
const READ_PREFIX: &str = "read-";
const WRITE_PREFIX: &str = "write-";
const PERMIT_PREFIX: &str = "permit-";
/// Digits of the counter the server appends to sequential names.
const SEQ_DIGITS: usize = 10;

/// A read-write lock under `/kord/rwlocks/<name>`: any number of readers, or one writer.
/// Fair: readers queue behind a writer that asked before them, so writers don't starve.
///
/// A reader waits for the last `write-` node before its own; a writer for the node just before
/// its own (which only goes once everything before it has gone or goes itself).
#[derive(Debug)]
pub struct RwLock<'a> {
    session: &'a Session,
    dir: String,
}

/// Whether an [`RwLockGuard`] holds the lock shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RwMode {
    Read,
    Write,
}

impl<'a> RwLock<'a> {
    /// `name` is one path component (no `/`).
    pub fn new(session: &'a Session, name: &str) -> Self {
        RwLock {
            session,
            dir: format!("{RWLOCK_DIR}/{name}"),
        }
    }

    /// Waits for shared access.
    pub async fn read(&self) -> Result<RwLockGuard, Error> {
        self.acquire(RwMode::Read).await
    }

    /// Waits for exclusive access.
    pub async fn write(&self) -> Result<RwLockGuard, Error> {
        self.acquire(RwMode::Write).await
    }

    async fn acquire(&self, mode: RwMode) -> Result<RwLockGuard, Error> {
        let prefix = match mode {
            RwMode::Read => READ_PREFIX,
            RwMode::Write => WRITE_PREFIX,
        };
        let node = enqueue(self.session, RWLOCK_DIR, &self.dir, prefix).await?;
        let client = self.session.client();
        loop {
            let children = client.children(&self.dir).await?;
            let pred = match rw_wait_for(&children, node.name()) {
                Wait::Gone => return Err(node.gone(self.session)),
                Wait::Acquired => return Ok(RwLockGuard { mode, node }),
                Wait::For(pred) => format!("{}/{pred}", self.dir),
            };
            let (stat, fired) = client.exists_watch(&pred).await?;
            if stat.is_none() {
                continue;
            }
            tokio::select! {
                () = self.session.expired() => return Err(Error::session_expired(self.session.id())),
                fired = fired => { fired?; }
            }
        }
    }
}

/// Shared or exclusive access to an [`RwLock`]; see [`NodeGuard`] for release.
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct RwLockGuard {
    mode: RwMode,
    node: NodeGuard,
}

impl RwLockGuard {
    pub fn mode(&self) -> RwMode {
        self.mode
    }

    /// The node that holds the place, e.g. `/kord/rwlocks/<name>/read-0000000007`.
    pub fn key(&self) -> &str {
        self.node.path()
    }

    /// The node's create revision: increases across successive writers, so it can fence a
    /// resource as [`crate::FencingGuard`] describes.
    pub fn fencing_token(&self) -> u64 {
        self.node.token
    }

    pub async fn release(self) -> Result<(), Error> {
        self.node.release().await
    }
}

/// A counting semaphore under `/kord/semaphores/<name>`: at most `permits` holders at a time,
/// granted in arrival order. Every participant must use the same `permits`.
///
/// The holders are the first `permits` children by sequence number. A waiter cannot watch
/// just the child before its own: holders release in any order, so the one before it may
/// stay while another holder's release makes room. It watches the children instead and
/// re-checks on every change (simple and correct, at the cost of waking every waiter).
#[derive(Debug)]
pub struct Semaphore<'a> {
    session: &'a Session,
    dir: String,
    permits: usize,
}

impl<'a> Semaphore<'a> {
    /// `name` is one path component (no `/`); `permits` is at least 1.
    pub fn new(session: &'a Session, name: &str, permits: usize) -> Self {
        Semaphore {
            session,
            dir: format!("{SEMAPHORE_DIR}/{name}"),
            permits,
        }
    }

    /// Waits for a permit.
    pub async fn acquire(&self) -> Result<SemaphorePermit, Error> {
        if self.permits == 0 {
            return Err(Error::invalid("a semaphore needs at least one permit"));
        }
        let node = enqueue(self.session, SEMAPHORE_DIR, &self.dir, PERMIT_PREFIX).await?;
        let client = self.session.client();
        loop {
            let (children, fired) = client.children_watch(&self.dir).await?;
            match semaphore_state(&children, node.name(), self.permits) {
                Wait::Gone => return Err(node.gone(self.session)),
                Wait::Acquired => return Ok(SemaphorePermit { node }),
                Wait::For(()) => {}
            }
            tokio::select! {
                () = self.session.expired() => return Err(Error::session_expired(self.session.id())),
                fired = fired => { fired?; }
            }
        }
    }
}

/// A held permit of a [`Semaphore`]; see [`NodeGuard`] for release.
#[derive(Debug)]
#[must_use = "dropping the permit releases it"]
pub struct SemaphorePermit {
    node: NodeGuard,
}

impl SemaphorePermit {
    pub fn key(&self) -> &str {
        self.node.path()
    }

    pub async fn release(self) -> Result<(), Error> {
        self.node.release().await
    }
}

/// A participant's ephemeral node. Released by deleting it; dropping it unreleased (also by
/// cancelling a wait) spawns the delete in the background, best effort: the session's expiry
/// or close is the backstop.
#[derive(Debug)]
struct NodeGuard {
    client: Client,
    path: String,
    token: u64,
    armed: bool,
}

impl NodeGuard {
    fn path(&self) -> &str {
        &self.path
    }

    fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or_default()
    }

    /// Our node vanished while we waited: the session ended, or someone deleted it.
    fn gone(mut self, session: &Session) -> Error {
        self.armed = false;
        if session.is_expired() {
            return Error::session_expired(session.id());
        }
        Error::NoNode {
            message: format!("{} was deleted while waiting", self.path),
            failed_op: None,
        }
    }

    /// Deletes the node; one already gone counts as released.
    async fn release(mut self) -> Result<(), Error> {
        self.armed = false;
        match self.client.delete(&self.path, None).await {
            Ok(()) | Err(Error::NoNode { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let path = std::mem::take(&mut self.path);
        runtime.spawn(async move {
            if let Err(err) = client.delete(&path, None).await {
                tracing::debug!(%path, error = %err, "delete of a dropped recipe node failed");
            }
        });
    }
}

/// Creates our node `<dir>/<prefix>NNNNNNNNNN`, making `/kord`, `root` (persistent) and `dir`
/// (a container, reaped once empty) if missing. The container may be reaped between its
/// creation and our node's: then both are made again.
async fn enqueue(
    session: &Session,
    root: &str,
    dir: &str,
    prefix: &str,
) -> Result<NodeGuard, Error> {
    let client = session.client();
    let mut last = None;
    for _ in 0..3 {
        match client
            .create_ephemeral_sequential(&format!("{dir}/{prefix}"), "", session)
            .await
        {
            Ok(created) => {
                return Ok(NodeGuard {
                    client: client.clone(),
                    path: created.path,
                    token: created.stat.create_revision,
                    armed: true,
                })
            }
            Err(err @ Error::NoNode { .. }) => last = Some(err),
            Err(err) => return Err(err),
        }
        for (path, container) in [(ROOT, false), (root, false), (dir, true)] {
            let made = if container {
                client.create_container(path, "").await
            } else {
                client.create(path, "").await
            };
            match made {
                Ok(_) | Err(Error::NodeExists { .. }) => {}
                Err(err) => return Err(err),
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::invalid(format!("{dir} kept vanishing"))))
}

/// What a participant waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wait<T> {
    /// It holds the lock or permit.
    Acquired,
    /// The deletion of this node (rwlock) / any change of the children (semaphore).
    For(T),
    /// Its own node is not among the children.
    Gone,
}

/// The counter at the end of a sequential node's name.
fn seq_of(name: &str) -> Option<u64> {
    let digits = name.get(name.len().checked_sub(SEQ_DIGITS)?..)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Children in queue order: by sequence number (their prefixes differ, so bytewise order is
/// not queue order), skipping names without one.
fn queue_order(children: &[String]) -> Vec<&str> {
    let mut queue: Vec<(u64, &str)> = children
        .iter()
        .filter_map(|c| Some((seq_of(c)?, c.as_str())))
        .collect();
    queue.sort_by(|a, b| match a.0.cmp(&b.0) {
        Ordering::Equal => a.1.cmp(b.1),
        o => o,
    });
    queue.into_iter().map(|(_, c)| c).collect()
}

/// For the rwlock node `me`: a reader waits for the last writer before it, a writer for the
/// node just before it.
fn rw_wait_for(children: &[String], me: &str) -> Wait<String> {
    let queue = queue_order(children);
    let Some(pos) = queue.iter().position(|c| *c == me) else {
        return Wait::Gone;
    };
    let before = &queue[..pos];
    let pred = if me.starts_with(READ_PREFIX) {
        before.iter().rev().find(|c| c.starts_with(WRITE_PREFIX))
    } else {
        before.last()
    };
    match pred {
        Some(p) => Wait::For((*p).to_owned()),
        None => Wait::Acquired,
    }
}

/// For the semaphore node `me`: a holder is among the first `permits` in queue order.
fn semaphore_state(children: &[String], me: &str, permits: usize) -> Wait<()> {
    match queue_order(children).iter().position(|c| *c == me) {
        None => Wait::Gone,
        Some(pos) if pos < permits => Wait::Acquired,
        Some(_) => Wait::For(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn sequence_numbers_and_queue_order() {
        assert_eq!(seq_of("read-0000000012"), Some(12));
        assert_eq!(seq_of("write-0000000003"), Some(3));
        assert_eq!(seq_of("junk"), None);
        assert_eq!(seq_of("x-00000000a1"), None);
        let c = names(&[
            "write-0000000005",
            "read-0000000007",
            "read-0000000002",
            "junk",
        ]);
        assert_eq!(
            queue_order(&c),
            ["read-0000000002", "write-0000000005", "read-0000000007"]
        );
    }

    #[test]
    fn readers_wait_only_for_an_earlier_writer() {
        let c = names(&[
            "read-0000000001",
            "read-0000000002",
            "write-0000000003",
            "read-0000000004",
            "write-0000000005",
            "read-0000000006",
        ]);
        assert_eq!(rw_wait_for(&c, "read-0000000001"), Wait::Acquired);
        assert_eq!(rw_wait_for(&c, "read-0000000002"), Wait::Acquired);
        assert_eq!(
            rw_wait_for(&c, "read-0000000004"),
            Wait::For("write-0000000003".into())
        );
        assert_eq!(
            rw_wait_for(&c, "read-0000000006"),
            Wait::For("write-0000000005".into())
        );
        assert_eq!(rw_wait_for(&c, "read-0000000009"), Wait::Gone);
    }

    #[test]
    fn writers_wait_for_the_node_just_before() {
        let c = names(&[
            "write-0000000010",
            "read-0000000011",
            "read-0000000012",
            "write-0000000013",
        ]);
        assert_eq!(rw_wait_for(&c, "write-0000000010"), Wait::Acquired);
        assert_eq!(
            rw_wait_for(&c, "write-0000000013"),
            Wait::For("read-0000000012".into())
        );
        // Bytewise "read-" < "write-", but the queue is by sequence number.
        assert_eq!(
            rw_wait_for(&c, "read-0000000011"),
            Wait::For("write-0000000010".into())
        );
    }

    #[test]
    fn semaphore_holders_are_the_first_permits() {
        let c = names(&[
            "permit-0000000004",
            "permit-0000000001",
            "permit-0000000009",
        ]);
        assert_eq!(semaphore_state(&c, "permit-0000000001", 2), Wait::Acquired);
        assert_eq!(semaphore_state(&c, "permit-0000000004", 2), Wait::Acquired);
        assert_eq!(semaphore_state(&c, "permit-0000000009", 2), Wait::For(()));
        assert_eq!(semaphore_state(&c, "permit-0000000009", 3), Wait::Acquired);
        assert_eq!(semaphore_state(&c, "permit-0000000002", 3), Wait::Gone);
        // A holder other than the one just before leaves: the waiter now holds.
        let c = names(&["permit-0000000004", "permit-0000000009"]);
        assert_eq!(semaphore_state(&c, "permit-0000000009", 2), Wait::Acquired);
    }
}
