//! Command line: `run` (the phases), `plot` (latency against offered load, to PNG) and the
//! hidden `idle-worker`. Every count and duration has an upper bound, so a typo cannot turn
//! the bench into an unbounded load.

use std::path::PathBuf;

use anyhow::{bail, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::target::{parse_endpoint, Endpoint};
use crate::{docload, fanout, idle, throughput};

#[derive(Debug, Parser)]
#[command(
    name = "secsync-bench",
    about = "Load generator for a secsync relay on loopback (throughput, fanout, docload, idle)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run phases against relay endpoints (started by a script, e.g. bench/run.sh).
    Run(Box<RunArgs>),
    /// Render latency against offered load from `throughput` JSON lines to a PNG.
    Plot(PlotArgs),
    /// Tabulate every metric per target with the ratio to the baseline(s).
    Compare(CompareArgs),
    /// Internal: holds idle connections for the `idle` phase.
    #[command(hide = true)]
    IdleWorker(WorkerArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    Throughput,
    Fanout,
    Docload,
    Idle,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Self::Throughput => "throughput",
            Self::Fanout => "fanout",
            Self::Docload => "docload",
            Self::Idle => "idle",
        }
    }
}

#[derive(Debug, Args)]
#[allow(clippy::struct_excessive_bools)] // independent switches
pub struct RunArgs {
    /// Relay endpoint, `ws://127.0.0.1:PORT[/prefix]`; repeat for several gateways. Loopback only.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Phases to run, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "throughput,fanout,docload,idle"
    )]
    pub phases: Vec<Phase>,
    /// Name of the target in the output (e.g. `ours-2gw`, `baseline-pg`).
    #[arg(long, default_value = "target")]
    pub label: String,
    /// Also append each phase's JSON line to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// No progress bars (they go to stderr and hide themselves when it is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// A phase that takes longer fails (at most 3,600).
    #[arg(long, default_value_t = 900)]
    pub phase_timeout_seconds: u64,
    /// A process whose CPU time is reported per phase, as NAME=PID (repeatable).
    #[arg(long = "watch", value_parser = parse_watch)]
    pub watch: Vec<(String, String)>,
    /// A command name whose processes' CPU time is summed per phase, e.g. `postgres` (repeatable).
    #[arg(long = "watch-comm")]
    pub watch_comms: Vec<String>,
    /// Plaintext bytes per update (a typical Yjs change is a few dozen).
    #[arg(long, default_value_t = 40)]
    pub update_bytes: usize,

    /// throughput: connected clients, each an author (at most 5,000).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// throughput: documents the clients are spread over (client c writes document c mod M).
    #[arg(long, default_value_t = 16)]
    pub docs: usize,
    /// throughput: updates in flight per client.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// throughput: measured seconds (at most 600).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// throughput: seconds before the measurement starts (sent, not counted).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_seconds: f64,
    /// throughput: offered updates per second over all clients (default: as fast as acks allow).
    #[arg(long)]
    pub rate: Option<f64>,
    /// throughput: updates built in total, at most (at most 2,000,000).
    #[arg(long, default_value_t = 300_000)]
    pub max_updates: usize,
    /// throughput and fanout: seconds deliveries may still take after the last reply.
    #[arg(long, default_value_t = 10.0)]
    pub drain_seconds: f64,

    /// fanout: receivers (at most 10,000).
    #[arg(long, default_value_t = 20)]
    pub fanout_receivers: usize,
    /// fanout: updates sent (at most 1,000,000).
    #[arg(long, default_value_t = 2000)]
    pub fanout_updates: usize,
    /// fanout: the first updates are not counted.
    #[arg(long, default_value_t = 100)]
    pub fanout_warmup: usize,
    /// fanout: updates per second at most (default: each right after the previous ack).
    #[arg(long)]
    pub fanout_rate: Option<f64>,

    /// docload: document sizes in updates.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub docload_sizes: Vec<usize>,
    /// docload: timed loads per document and mode (at most 10,000).
    #[arg(long, default_value_t = 30)]
    pub docload_repeats: usize,
    /// docload: plaintext bytes of the snapshot.
    #[arg(long, default_value_t = 8192)]
    pub snapshot_bytes: usize,
    /// docload: updates in flight while writing a document (not measured).
    #[arg(long, default_value_t = 16)]
    pub upload_window: usize,

    /// idle: connection counts at which the server's memory is read (at most 100,000).
    #[arg(long, value_delimiter = ',', default_value = "5000,10000,15000")]
    pub idle_steps: Vec<usize>,
    /// idle: pid of the relay process to measure; repeat to sum several.
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// idle: connections per worker process (a process here may open at most 20,000 files).
    #[arg(long, default_value_t = 10_000)]
    pub idle_per_process: usize,
    /// idle: loopback source addresses per worker process.
    #[arg(long, default_value_t = 4)]
    pub idle_sources: u8,
    /// idle: seconds to wait before each memory reading.
    #[arg(long, default_value_t = 3.0)]
    pub idle_settle_seconds: f64,
    /// idle: connections a worker opens at once.
    #[arg(long, default_value_t = 64)]
    pub idle_parallel: usize,
    /// idle: plaintext bytes of the idle document's snapshot.
    #[arg(long, default_value_t = 1024)]
    pub idle_snapshot_bytes: usize,
}

/// `NAME=PID` for `--watch`.
fn parse_watch(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, pid)) if !name.is_empty() && pid.parse::<u32>().is_ok() => {
            Ok((name.to_owned(), pid.to_owned()))
        }
        _ => Err(format!("{text:?} is not NAME=PID")),
    }
}

impl RunArgs {
    pub fn endpoints(&self) -> anyhow::Result<Vec<Endpoint>> {
        self.urls.iter().map(|u| parse_endpoint(u)).collect()
    }

    /// Refuses parameters outside the bounds (a bench must stop by itself).
    #[allow(clippy::too_many_lines)] // one check per flag, in flag order
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.phase_timeout_seconds > 0 && self.phase_timeout_seconds <= 3600,
            "--phase-timeout-seconds must be 1..=3600"
        );
        ensure!(
            (1..=5000).contains(&self.clients),
            "--clients must be 1..=5000"
        );
        ensure!(
            self.docs >= 1 && self.docs <= self.clients,
            "--docs must be 1..=--clients"
        );
        ensure!(
            (1..=1024).contains(&self.window),
            "--window must be 1..=1024"
        );
        ensure!(
            self.seconds > 0.0 && self.seconds <= 600.0,
            "--seconds must be in (0, 600]"
        );
        ensure!(
            (0.0..=60.0).contains(&self.warmup_seconds),
            "--warmup-seconds must be 0..=60"
        );
        ensure!(
            (0.0..=120.0).contains(&self.drain_seconds),
            "--drain-seconds must be 0..=120"
        );
        if let Some(rate) = self.rate {
            ensure!(
                rate > 0.0 && rate <= 1_000_000.0,
                "--rate must be in (0, 1000000]"
            );
        }
        ensure!(
            (1..=2_000_000).contains(&self.max_updates),
            "--max-updates must be 1..=2000000"
        );
        ensure!(
            (1..=1_000_000).contains(&self.update_bytes),
            "--update-bytes must be 1..=1000000"
        );
        ensure!(
            (1..=10_000).contains(&self.fanout_receivers),
            "--fanout-receivers must be 1..=10000"
        );
        ensure!(
            (1..=1_000_000).contains(&self.fanout_updates),
            "--fanout-updates must be 1..=1000000"
        );
        ensure!(
            self.fanout_warmup < self.fanout_updates,
            "--fanout-warmup must be below --fanout-updates"
        );
        if let Some(rate) = self.fanout_rate {
            ensure!(
                rate > 0.0 && rate <= 100_000.0,
                "--fanout-rate must be in (0, 100000]"
            );
        }
        ensure!(
            !self.docload_sizes.is_empty()
                && self.docload_sizes.iter().all(|n| (1..=200_000).contains(n)),
            "--docload-sizes must be 1..=200000 each"
        );
        ensure!(
            (1..=10_000).contains(&self.docload_repeats),
            "--docload-repeats must be 1..=10000"
        );
        ensure!(
            (1..=64 * 1024 * 1024).contains(&self.snapshot_bytes),
            "--snapshot-bytes must be 1..=67108864"
        );
        ensure!(
            (1..=1024).contains(&self.upload_window),
            "--upload-window must be 1..=1024"
        );
        if self.phases.contains(&Phase::Idle) {
            ensure!(
                !self.idle_steps.is_empty(),
                "--idle-steps must name at least one count"
            );
            if self.idle_steps.windows(2).any(|w| w[0] >= w[1])
                || self.idle_steps.iter().any(|s| *s == 0 || *s > 100_000)
            {
                bail!("--idle-steps must be increasing counts in 1..=100000");
            }
            ensure!(
                !self.server_pids.is_empty(),
                "the idle phase needs --server-pid"
            );
            ensure!(
                (1..=19_000).contains(&self.idle_per_process),
                "--idle-per-process must be 1..=19000 (a process may open at most 20,000 files)"
            );
            ensure!(
                (1..=32).contains(&self.idle_sources),
                "--idle-sources must be 1..=32"
            );
            ensure!(
                (1..=1024).contains(&self.idle_parallel),
                "--idle-parallel must be 1..=1024"
            );
            ensure!(
                (0.0..=60.0).contains(&self.idle_settle_seconds),
                "--idle-settle-seconds must be 0..=60"
            );
        }
        Ok(())
    }

    pub fn throughput_params(&self) -> throughput::Params {
        throughput::Params {
            clients: self.clients,
            docs: self.docs,
            window: self.window,
            seconds: self.seconds,
            warmup_seconds: self.warmup_seconds,
            rate: self.rate,
            max_updates: self.max_updates,
            update_bytes: self.update_bytes,
            snapshot_bytes: 1024,
            drain_seconds: self.drain_seconds,
            watch: self.watch.clone(),
            watch_comms: self.watch_comms.clone(),
        }
    }

    pub fn fanout_params(&self) -> fanout::Params {
        fanout::Params {
            receivers: self.fanout_receivers,
            updates: self.fanout_updates,
            rate: self.fanout_rate,
            warmup_updates: self.fanout_warmup,
            update_bytes: self.update_bytes,
            drain_seconds: self.drain_seconds,
        }
    }

    pub fn docload_params(&self) -> docload::Params {
        docload::Params {
            sizes: self.docload_sizes.clone(),
            repeats: self.docload_repeats,
            snapshot_bytes: self.snapshot_bytes,
            update_bytes: self.update_bytes,
            upload_window: self.upload_window,
        }
    }

    pub fn idle_params(&self) -> idle::Params {
        idle::Params {
            steps: self.idle_steps.clone(),
            server_pids: self.server_pids.clone(),
            per_process: self.idle_per_process,
            sources_per_worker: self.idle_sources,
            settle_seconds: self.idle_settle_seconds,
            parallel: self.idle_parallel,
            snapshot_bytes: self.idle_snapshot_bytes,
        }
    }
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// JSON-lines files written with `--json-out` (throughput lines with `offered_rate`).
    #[arg(long = "input", required = true)]
    pub inputs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long)]
    pub output: PathBuf,
    /// Title above the plot.
    #[arg(
        long,
        default_value = "secsync relay: acknowledgement latency against offered load"
    )]
    pub title: String,
    /// A TrueType font for the labels (Debian: fonts-dejavu-core).
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    pub font: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// JSON-lines files written with `--json-out`.
    #[arg(long = "input", required = true)]
    pub inputs: Vec<PathBuf>,
    /// Label(s) of the baseline(s) the other targets are divided by.
    #[arg(long = "baseline", required = true)]
    pub baselines: Vec<String>,
    /// Also write the summary as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    #[arg(long)]
    pub doc: String,
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub first_source: u8,
    #[arg(long)]
    pub sources: u8,
    #[arg(long, default_value_t = 64)]
    pub parallel: usize,
}

impl WorkerArgs {
    pub fn into_params(self) -> idle::WorkerParams {
        idle::WorkerParams {
            urls: self.urls,
            doc: self.doc,
            count: self.count.min(19_000),
            first_source: self.first_source,
            sources: self.sources,
            parallel: self.parallel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["secsync-bench", "run", "--url", "ws://127.0.0.1:4000"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(args) => *args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn a_worker_takes_a_document_id_that_begins_with_a_dash() {
        // Random ids are base64url: one in 64 begins with '-', and the spawner passes `--doc=ID`.
        let argv = [
            "secsync-bench",
            "idle-worker",
            "--url",
            "ws://127.0.0.1:4000",
            "--doc=-Kx3",
            "--count",
            "10",
            "--first-source",
            "2",
            "--sources",
            "1",
        ];
        match Cli::try_parse_from(argv).unwrap().command {
            Command::IdleWorker(args) => assert_eq!(args.doc, "-Kx3"),
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_issue_phases() {
        let a = run_args(&[]);
        assert_eq!(
            a.phases,
            [
                Phase::Throughput,
                Phase::Fanout,
                Phase::Docload,
                Phase::Idle
            ]
        );
        assert_eq!(a.docload_sizes, [1000, 10_000]);
        assert_eq!(a.idle_steps, [5000, 10_000, 15_000]);
        assert_eq!(a.rate, None);
        // idle needs a pid
        assert!(a.check().is_err());
        let a = run_args(&["--server-pid", "42"]);
        a.check().unwrap();
        assert_eq!(a.idle_params().server_pids, [42]);
    }

    #[test]
    fn phases_rates_and_several_urls() {
        let a = run_args(&[
            "--url",
            "ws://localhost:4001",
            "--phases",
            "fanout,throughput",
            "--rate",
            "2500",
            "--clients",
            "8",
            "--docs",
            "4",
        ]);
        assert_eq!(a.phases, [Phase::Fanout, Phase::Throughput]);
        assert_eq!(a.endpoints().unwrap().len(), 2);
        assert_eq!(a.throughput_params().rate, Some(2500.0));
        a.check().unwrap();
        let a = run_args(&["--watch", "gateway-a=123", "--watch-comm", "postgres"]);
        assert_eq!(a.watch, [("gateway-a".to_owned(), "123".to_owned())]);
        assert_eq!(a.watch_comms, ["postgres"]);
        assert!(Cli::try_parse_from([
            "secsync-bench",
            "run",
            "--url",
            "ws://127.0.0.1:1",
            "--watch",
            "nopid"
        ])
        .is_err());
    }

    #[test]
    fn bounds_are_enforced() {
        for bad in [
            &["--phases", "throughput", "--clients", "0"][..],
            &["--phases", "throughput", "--clients", "4", "--docs", "5"],
            &["--phases", "throughput", "--seconds", "601"],
            &["--phases", "throughput", "--rate", "0"],
            &[
                "--phases",
                "idle",
                "--server-pid",
                "1",
                "--idle-steps",
                "10,5",
            ],
            &[
                "--phases",
                "idle",
                "--server-pid",
                "1",
                "--idle-per-process",
                "25000",
            ],
            &[
                "--phases",
                "fanout",
                "--fanout-updates",
                "10",
                "--fanout-warmup",
                "10",
            ],
        ] {
            assert!(run_args(bad).check().is_err(), "{bad:?} accepted");
        }
        assert!(Cli::try_parse_from(["secsync-bench", "run", "--phases", "throughput"]).is_err());
        assert!(Cli::try_parse_from([
            "secsync-bench",
            "run",
            "--url",
            "ws://127.0.0.1:1",
            "--phases",
            "bogus"
        ])
        .is_err());
        let a = run_args(&["--url", "ws://10.1.2.3:4000"]);
        assert!(a.endpoints().is_err(), "non-loopback target accepted");
    }
}
