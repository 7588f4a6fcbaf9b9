//! The result of one run: throughput, latency percentiles, errors and CPU seconds, as a JSON
//! line and as a line of text.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::config::{RunConfig, Target, Workload};

/// Latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// One run's figures. Latencies are in milliseconds. A workload the target cannot run has
/// `status == "n/a"`, no figures and a `note` saying why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub target: Target,
    pub setup: String,
    pub workload: Workload,
    pub clients: usize,
    pub connections: usize,
    /// Requested total rate (ops/s), if paced.
    pub rate: Option<f64>,
    pub watchers: usize,
    pub value_size: usize,
    pub keys: usize,
    pub duration_s: f64,
    /// "ok" or "n/a".
    pub status: String,
    pub note: Option<String>,
    pub ops: Option<u64>,
    pub ops_per_sec: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub errors: Option<u64>,
    /// CPU seconds (user + system) of the server processes during the measured window.
    pub server_cpu_s: Option<f64>,
    /// CPU seconds of this benchmark process during the measured window.
    pub client_cpu_s: Option<f64>,
    /// Which round of a `compare --rounds N` run this is (1-based); absent for a single round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
}

impl Report {
    fn base(cfg: &RunConfig) -> Report {
        Report {
            target: cfg.target,
            setup: cfg.setup.clone(),
            workload: cfg.workload,
            clients: cfg.clients,
            connections: cfg.connections,
            rate: cfg.rate,
            watchers: cfg.watcher_count(),
            value_size: cfg.value_size,
            keys: cfg.keys,
            duration_s: cfg.duration.as_secs_f64(),
            status: "ok".into(),
            note: None,
            ops: None,
            ops_per_sec: None,
            p50_ms: None,
            p90_ms: None,
            p99_ms: None,
            p999_ms: None,
            max_ms: None,
            errors: None,
            server_cpu_s: None,
            client_cpu_s: None,
            round: None,
        }
    }

    /// The report of a workload the target cannot run.
    pub fn not_available(cfg: &RunConfig, why: impl Into<String>) -> Report {
        Report {
            status: "n/a".into(),
            note: Some(why.into()),
            ..Report::base(cfg)
        }
    }

    pub(crate) fn measured(
        cfg: &RunConfig,
        ops: u64,
        errors: u64,
        elapsed_s: f64,
        hist: &Histogram<u64>,
        cpu: (Option<f64>, f64),
    ) -> Report {
        let ms = |us: u64| us as f64 / 1000.0;
        let pct = |q: f64| (!hist.is_empty()).then(|| ms(hist.value_at_quantile(q)));
        Report {
            ops: Some(ops),
            ops_per_sec: Some(if elapsed_s > 0.0 {
                ops as f64 / elapsed_s
            } else {
                0.0
            }),
            duration_s: elapsed_s,
            p50_ms: pct(0.50),
            p90_ms: pct(0.90),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
            max_ms: (!hist.is_empty()).then(|| ms(hist.max())),
            errors: Some(errors),
            server_cpu_s: cpu.0,
            client_cpu_s: Some(cpu.1),
            ..Report::base(cfg)
        }
    }

    pub fn is_na(&self) -> bool {
        self.status == "n/a"
    }

    /// The report as one line of JSON.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("a report serializes")
    }

    /// A one-line human summary; "n/a" for a workload the target cannot run.
    pub fn summary(&self) -> String {
        let head = format!(
            "{} {} {} clients={} conns={}{}",
            self.target,
            if self.setup.is_empty() {
                "-"
            } else {
                &self.setup
            },
            self.workload,
            self.clients,
            self.connections,
            self.rate
                .map(|r| format!(" rate={r}/s"))
                .unwrap_or_default()
        );
        if self.is_na() {
            return format!(
                "{head}: n/a ({})",
                self.note.as_deref().unwrap_or("unsupported")
            );
        }
        format!(
            "{head}: {} ops/s, p50 {} p90 {} p99 {} p99.9 {} max {} ms, errors {}, cpu server {} s client {} s",
            fmt_num(self.ops_per_sec),
            fmt_ms(self.p50_ms),
            fmt_ms(self.p90_ms),
            fmt_ms(self.p99_ms),
            fmt_ms(self.p999_ms),
            fmt_ms(self.max_ms),
            self.errors.unwrap_or(0),
            fmt_cpu(self.server_cpu_s),
            fmt_cpu(self.client_cpu_s),
        )
    }
}

/// `12,345` style ops/s; "n/a" when missing.
pub fn fmt_num(v: Option<f64>) -> String {
    let Some(v) = v else { return "n/a".into() };
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

pub fn fmt_cpu(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "n/a".into())
}
