//! Step 2b: the network the nemesis can break. Each member runs in its own network namespace
//! with a veth to a bridge in the host namespace (where the test's clients are). A partition
//! is a pair of blackhole routes (one in each member's namespace); a slow link is a `tc`
//! qdisc on a member's veth (netem delay when the kernel has it, else a tbf rate limit).
//! Everything is torn down on drop, panics included.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cluster::MemberHost;

static NEXT_NETWORK: AtomicU32 = AtomicU32::new(0);

/// Why namespaces are unavailable, or the setup failure.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network namespaces need root (running as uid {0})")]
    NotRoot(u32),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("no free 10.213.x.0/24 subnet for the bridge")]
    NoSubnet,
}

/// Namespaces `slots` members can run in (member id `i` in slot `i`).
#[derive(Debug)]
pub struct Network {
    tag: String,
    bridge: String,
    subnet: u8,
    slots: usize,
    /// Blackholed (from, to) pairs, both directions listed.
    cuts: Vec<(usize, usize)>,
    slowed: Vec<usize>,
    /// Which qdisc made links slow ("netem" or "tbf"), once known.
    pub slow_kind: Option<&'static str>,
}

fn run(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetError::Command {
            command: args.join(" "),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn output(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

impl Network {
    /// Creates the bridge and `slots` namespaces. Fails (tearing down what it made) when not
    /// root or `ip` cannot do it.
    pub fn create(slots: usize) -> Result<Network, NetError> {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            return Err(NetError::NotRoot(uid));
        }
        let n = NEXT_NETWORK.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("kc{}{}", pid % 100_000, (b'a' + (n % 26) as u8) as char);
        // A subnet no other bridge on this machine routes.
        let subnet = (0..250u32)
            .map(|i| ((pid + n * 7 + i) % 250 + 1) as u8)
            .find(|s| {
                output(&["ip", "-4", "route", "show", &format!("10.213.{s}.0/24")])
                    .trim()
                    .is_empty()
            })
            .ok_or(NetError::NoSubnet)?;
        let mut net = Network {
            bridge: format!("{tag}br"),
            tag,
            subnet,
            slots: 0,
            cuts: Vec::new(),
            slowed: Vec::new(),
            slow_kind: None,
        };
        run(&["ip", "link", "add", &net.bridge, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("10.213.{subnet}.254/24"),
            "dev",
            &net.bridge,
        ])?;
        run(&["ip", "link", "set", &net.bridge, "up"])?;
        for slot in 1..=slots {
            // Counted before it exists so a half-made slot is torn down too.
            net.slots = slot;
            let ns = net.netns(slot);
            let veth = format!("{}v{slot}", net.tag);
            run(&["ip", "netns", "add", &ns])?;
            run(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            run(&["ip", "link", "set", &veth, "master", &net.bridge, "up"])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "ip",
                "addr",
                "add",
                &format!("{}/24", net.ip(slot)),
                "dev",
                "eth0",
            ])?;
            run(&[
                "ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up",
            ])?;
            run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    pub fn netns(&self, slot: usize) -> String {
        format!("{}n{slot}", self.tag)
    }

    pub fn ip(&self, slot: usize) -> String {
        format!("10.213.{}.{slot}", self.subnet)
    }

    /// Member placements for `ClusterOpts::hosts` (slot i for member id i).
    pub fn hosts(&self) -> Vec<MemberHost> {
        (1..=self.slots)
            .map(|s| MemberHost {
                ip: self.ip(s),
                netns: Some(self.netns(s)),
            })
            .collect()
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Drops all traffic between slots `a` and `b`, both ways.
    pub fn cut(&mut self, a: usize, b: usize) -> Result<(), NetError> {
        for (from, to) in [(a, b), (b, a)] {
            if self.cuts.contains(&(from, to)) {
                continue;
            }
            self.blackhole("add", from, to)?;
            self.cuts.push((from, to));
        }
        Ok(())
    }

    /// `ip route add|del blackhole <to>` inside `from`'s namespace: `from` cannot reach `to`.
    fn blackhole(&self, verb: &str, from: usize, to: usize) -> Result<(), NetError> {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.netns(from),
            "ip",
            "route",
            verb,
            "blackhole",
            &format!("{}/32", self.ip(to)),
        ])
    }

    /// Cuts every link between the two sides.
    pub fn partition(&mut self, side_a: &[usize], side_b: &[usize]) -> Result<(), NetError> {
        for &a in side_a {
            for &b in side_b {
                self.cut(a, b)?;
            }
        }
        Ok(())
    }

    /// Makes slot `s`'s link slow (both its peer and client traffic leave through it).
    pub fn slow(&mut self, s: usize) -> Result<&'static str, NetError> {
        let ns = self.netns(s);
        let netem = [
            "ip", "netns", "exec", &ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
            "delay", "150ms", "50ms",
        ];
        let kind = if run(&netem).is_ok() {
            "netem"
        } else {
            // This kernel has no netem: a narrow token bucket delays by queueing instead.
            run(&[
                "ip", "netns", "exec", &ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                "rate", "256kbit", "burst", "8kbit", "latency", "400ms",
            ])?;
            "tbf"
        };
        self.slowed.push(s);
        self.slow_kind = Some(kind);
        Ok(kind)
    }

    /// Removes every cut and slow link.
    pub fn heal(&mut self) -> Result<(), NetError> {
        let mut first_err = None;
        for (from, to) in std::mem::take(&mut self.cuts) {
            let r = self.blackhole("del", from, to);
            first_err = first_err.or(r.err());
        }
        for s in std::mem::take(&mut self.slowed) {
            let r = run(&[
                "ip",
                "netns",
                "exec",
                &self.netns(s),
                "tc",
                "qdisc",
                "del",
                "dev",
                "eth0",
                "root",
            ]);
            first_err = first_err.or(r.err());
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and with it the pair.
        for slot in 1..=self.slots {
            let _ = run(&["ip", "netns", "del", &self.netns(slot)]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
