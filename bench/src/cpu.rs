//! CPU seconds (user + system) of processes, from /proc/PID/stat.

use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
fn ticks_per_sec() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// utime + stime of `/proc/<pid>/stat` (`pid` "self" for this process), in seconds.
fn cpu_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|ticks| ticks as f64 / ticks_per_sec())
}

/// Fields 14 and 15 (utime, stime) of a stat line; the command name (field 2) may contain
/// spaces and parentheses, so fields are counted after its last ')'.
fn parse_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 -> index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds used so far by this process.
pub fn self_cpu() -> f64 {
    cpu_of("self").unwrap_or(0.0)
}

/// CPU seconds used so far by the given processes; `None` when none is given or none could be
/// read.
pub fn pids_cpu(pids: &[u32]) -> Option<f64> {
    let vals: Vec<f64> = pids.iter().filter_map(|p| cpu_of(&p.to_string())).collect();
    (!vals.is_empty()).then(|| vals.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_name() {
        let line = "123 (a b) c)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_stat(line), Some(300));
    }

    #[test]
    fn reads_own_cpu() {
        assert!(self_cpu() >= 0.0);
        assert!(pids_cpu(&[std::process::id()]).is_some());
        assert!(pids_cpu(&[]).is_none());
    }
}
