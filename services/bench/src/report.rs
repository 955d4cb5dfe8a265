//! What a phase hands back: a verdict, lines for people, fields for the JSON line.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

/// The outcome of one phase.
#[derive(Debug, Default)]
pub struct PhaseReport {
    /// False when the phase saw a failure (missing deliveries, lost replies, refused
    /// connections, …); the process then exits non-zero.
    pub ok: bool,
    pub problems: Vec<String>,
    pub lines: Vec<String>,
    pub fields: Map<String, Value>,
}

impl PhaseReport {
    pub fn new() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }

    pub fn line(&mut self, text: impl Into<String>) {
        self.lines.push(text.into());
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.fields.insert(key.to_owned(), value.into());
    }

    /// Records a failure: the phase's verdict becomes "failed".
    pub fn fail(&mut self, problem: impl Into<String>) {
        self.ok = false;
        self.problems.push(problem.into());
    }
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), if readable.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

/// Resident memory of a process in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| anyhow::anyhow!("reading /proc/{pid}/status: {e} (is --server-pid right?)"))?;
    parse_vm_rss(&status).ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Clock ticks per second of `/proc/*/stat` times (`CLK_TCK`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU of a process in clock ticks (`/proc/PID/stat` fields 14 and 15).
pub fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
}

/// CPU ticks of every process whose command name is `comm` (e.g. all `postgres` backends).
pub fn comm_ticks(comm: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == comm)
        })
        .filter_map(|e| cpu_ticks(&e.file_name().to_string_lossy()))
        .sum()
}

/// Where the CPU went during a phase: the watched processes and this one. (The machine-wide
/// counters of `/proc/stat` are not used: on this VM they are credited in lumps, seconds late.)
#[derive(Debug, Clone)]
pub struct CpuWatch {
    pids: Vec<(String, String)>,
    comms: Vec<String>,
    before: Vec<u64>,
    started: std::time::Instant,
}

impl CpuWatch {
    /// `pids`: (name, pid); `comms`: command names summed over all their processes.
    pub fn start(pids: &[(String, String)], comms: &[String]) -> Self {
        let mut w = Self {
            pids: pids.to_vec(),
            comms: comms.to_vec(),
            before: Vec::new(),
            started: std::time::Instant::now(),
        };
        w.before = w.read();
        w
    }

    fn read(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .pids
            .iter()
            .map(|(_, pid)| cpu_ticks(pid).unwrap_or(0))
            .collect();
        v.extend(self.comms.iter().map(|c| comm_ticks(c)));
        v.push(cpu_ticks("self").unwrap_or(0));
        v
    }

    /// Adds `cpu_seconds` and `wall_seconds` to the report, and a line.
    pub fn finish(self, report: &mut PhaseReport) {
        let after = self.read();
        let names = self
            .pids
            .iter()
            .map(|(n, _)| n.clone())
            .chain(self.comms.iter().map(|c| format!("all {c}")))
            .chain(std::iter::once("secsync-bench".to_owned()));
        let mut fields = Map::new();
        let mut parts = Vec::new();
        for ((name, a), b) in names.zip(&after).zip(&self.before) {
            let secs = a.saturating_sub(*b) as f64 / TICKS_PER_SECOND;
            parts.push(format!("{name} {secs:.1} s"));
            fields.insert(name, Value::from((secs * 100.0).round() / 100.0));
        }
        let wall = self.started.elapsed().as_secs_f64();
        report.line(format!(
            "  CPU in {wall:.0} s (of {:.0} core-seconds): {}",
            wall * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
            parts.join(", ")
        ));
        report.set("wall_seconds", (wall * 100.0).round() / 100.0);
        report.set("cpu_seconds", Value::Object(fields));
    }
}

/// Progress bars go to stderr and vanish when it is not a terminal (or with `--no-progress`).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub enabled: bool,
}

impl Progress {
    pub fn bar(self, len: u64, what: &str) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        let style = ProgressStyle::with_template(
            "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(250));
        bar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tsecsync\nVmPeak:\t  200 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        // Our own process always has one.
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn cpu_ticks_are_fields_14_and_15() {
        let stat = "1234 (a (weird) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert!(cpu_ticks("self").is_some());
    }

    #[test]
    fn failing_a_report_flips_its_verdict() {
        let mut r = PhaseReport::new();
        assert!(r.ok);
        r.fail("3 deliveries missing");
        assert!(!r.ok);
        assert_eq!(r.problems.len(), 1);
    }
}
