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

/// Nanoseconds the threads of a process spent runnable but waiting for a CPU, summed over its
/// live threads (`/proc/PID/task/*/schedstat`, second field; threads that ended are not counted).
pub fn run_queue_wait_ns(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|text| parse_run_queue_wait(&text))
        .sum()
}

fn parse_run_queue_wait(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(1)?.parse().ok()
}

/// CPU ticks and run-queue wait (ns) of a process.
fn usage(pid: &str) -> (u64, u64) {
    (cpu_ticks(pid).unwrap_or(0), run_queue_wait_ns(pid))
}

/// [`usage`] summed over every process whose command name is `comm` (e.g. all `postgres`
/// backends).
pub fn comm_usage(comm: &str) -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0);
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
        .map(|e| usage(&e.file_name().to_string_lossy()))
        .fold((0, 0), |(t, w), (t1, w1)| (t + t1, w + w1))
}

/// Where the CPU went during a phase: the watched processes and this one, and how long their
/// threads waited for a CPU while runnable (on 2 shared cores, the part of latency that is
/// neither work nor I/O). (The machine-wide counters of `/proc/stat` are not used: on this VM
/// they are credited in lumps, seconds late.)
#[derive(Debug, Clone)]
pub struct CpuWatch {
    pids: Vec<(String, String)>,
    comms: Vec<String>,
    before: Vec<(u64, u64)>,
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

    fn read(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.pids.iter().map(|(_, pid)| usage(pid)).collect();
        v.extend(self.comms.iter().map(|c| comm_usage(c)));
        v.push(usage("self"));
        v
    }

    /// Adds `cpu_seconds`, `run_queue_wait_seconds` and `wall_seconds` to the report, and two
    /// lines.
    pub fn finish(self, report: &mut PhaseReport) {
        let after = self.read();
        let names = self
            .pids
            .iter()
            .map(|(n, _)| n.clone())
            .chain(self.comms.iter().map(|c| format!("all {c}")))
            .chain(std::iter::once("secsync-bench".to_owned()));
        let (mut cpu, mut waits) = (Map::new(), Map::new());
        let (mut cpu_parts, mut wait_parts) = (Vec::new(), Vec::new());
        for ((name, a), b) in names.zip(&after).zip(&self.before) {
            let secs = a.0.saturating_sub(b.0) as f64 / TICKS_PER_SECOND;
            let waited = a.1.saturating_sub(b.1) as f64 / 1e9;
            cpu_parts.push(format!("{name} {secs:.1} s"));
            wait_parts.push(format!("{name} {waited:.2} s"));
            cpu.insert(name.clone(), Value::from((secs * 100.0).round() / 100.0));
            waits.insert(name, Value::from((waited * 1000.0).round() / 1000.0));
        }
        let wall = self.started.elapsed().as_secs_f64();
        report.line(format!(
            "  CPU in {wall:.0} s (of {:.0} core-seconds): {}",
            wall * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
            cpu_parts.join(", ")
        ));
        report.line(format!(
            "  runnable but waiting for a CPU: {}",
            wait_parts.join(", ")
        ));
        report.set("wall_seconds", (wall * 100.0).round() / 100.0);
        report.set("cpu_seconds", Value::Object(cpu));
        report.set("run_queue_wait_seconds", Value::Object(waits));
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
    fn run_queue_wait_is_the_second_schedstat_field() {
        assert_eq!(
            parse_run_queue_wait("186059051 9507105 373\n"),
            Some(9_507_105)
        );
        assert_eq!(parse_run_queue_wait("12"), None);
        // Every thread of this process has a schedstat to read (its wait may be 0).
        assert!(std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(Result::ok)
            .any(|t| parse_run_queue_wait(
                &std::fs::read_to_string(t.path().join("schedstat")).unwrap()
            )
            .is_some()));
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
