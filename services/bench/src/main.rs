//! `secsync-bench`: the load generator for a secsync relay (issue 10).
//!
//! Drives a running relay (our gateways, the embedded `secsync`, or the reference server) on
//! loopback with the real client library's signed, encrypted frames, all built before any clock
//! starts. Phases: `throughput`, `fanout`, `docload`, `idle` (see each module). Prints a human
//! summary and one JSON line per phase (also appended to `--json-out`), and exits non-zero if a
//! phase failed (missing deliveries, lost replies, refused connections). It never starts
//! servers: `bench/run.sh` does.
//!
//!     secsync-bench run --url ws://127.0.0.1:4000 --phases throughput,fanout --label ours
//!     secsync-bench plot --input results.jsonl --output bench/latency-vs-load.png

mod cli;
mod compare;
mod docload;
mod fanout;
mod idle;
mod pipeline;
mod plot;
mod report;
mod setup;
mod stats;
mod target;
mod throughput;

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use serde_json::{json, Map, Value};

use crate::cli::{Cli, Command, Phase, RunArgs};
use crate::report::{PhaseReport, Progress};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("secsync-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Plot(args) => plot::render(&args).map(|()| true),
            Command::Compare(args) => compare_files(&args).map(|()| true),
            Command::IdleWorker(args) => idle::worker(args.into_params()).await.map(|()| true),
        }
    });
    // Idle workers' reader tasks must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("secsync-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the requested phases in order; false if any failed.
async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let endpoints = args.endpoints()?;
    args.check()?;
    let progress = Progress {
        enabled: !args.no_progress,
    };
    let mut all_ok = true;
    for phase in &args.phases {
        let limit = Duration::from_secs(args.phase_timeout_seconds);
        let fut = async {
            match phase {
                Phase::Throughput => {
                    throughput::run(&endpoints, &args.throughput_params(), progress).await
                }
                Phase::Fanout => fanout::run(&endpoints, &args.fanout_params(), progress).await,
                Phase::Docload => docload::run(&endpoints, &args.docload_params(), progress).await,
                Phase::Idle => idle::run(&endpoints, &args.idle_params(), progress).await,
            }
        };
        // The throughput phase watches its timed part itself (not the signing before it).
        let cpu = (*phase != Phase::Throughput)
            .then(|| report::CpuWatch::start(&args.watch, &args.watch_comms));
        let mut report = match tokio::time::timeout(limit, fut).await {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => {
                let mut r = PhaseReport::new();
                r.fail(format!("{e:#}"));
                r
            }
            Err(_) => {
                let mut r = PhaseReport::new();
                r.fail(format!(
                    "did not finish within --phase-timeout-seconds {}",
                    args.phase_timeout_seconds
                ));
                r
            }
        };
        if let Some(cpu) = cpu {
            cpu.finish(&mut report);
        }
        all_ok &= report.ok;
        emit(&args, *phase, &endpoints, report)?;
    }
    Ok(all_ok)
}

/// `compare`: prints the table and writes the JSON summary.
fn compare_files(args: &cli::CompareArgs) -> anyhow::Result<()> {
    let mut text = String::new();
    for input in &args.inputs {
        text.push_str(&std::fs::read_to_string(input)?);
        text.push('\n');
    }
    let (table, summary) = compare::table(&text, &args.baselines);
    print!("{table}");
    if let Some(path) = &args.json_out {
        std::fs::write(path, format!("{summary:#}\n"))?;
    }
    Ok(())
}

/// Prints the human summary and the JSON line (and appends the line to `--json-out`).
fn emit(
    args: &RunArgs,
    phase: Phase,
    endpoints: &[target::Endpoint],
    report: PhaseReport,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for line in &report.lines {
        writeln!(out, "{line}")?;
    }
    for p in &report.problems {
        writeln!(out, "  FAILED: {p}")?;
    }
    let mut obj = Map::new();
    obj.insert("bench".into(), json!("secsync-bench"));
    obj.insert("phase".into(), json!(phase.name()));
    obj.insert("label".into(), json!(args.label));
    obj.insert(
        "targets".into(),
        json!(endpoints.iter().map(|e| e.base.clone()).collect::<Vec<_>>()),
    );
    obj.insert("ok".into(), json!(report.ok));
    obj.insert("problems".into(), json!(report.problems));
    obj.extend(report.fields);
    let line = Value::Object(obj).to_string();
    writeln!(out, "{line}")?;
    out.flush()?;
    if let Some(path) = &args.json_out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(file, "{line}")?;
    }
    Ok(())
}
