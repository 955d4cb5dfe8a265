//! `secsync`: parse config, start logging, serve until SIGTERM, drain.

use clap::Parser as _;
use secsync::config::Config;

// See the workspace Cargo.toml: freed large buffers are reused instead of faulted in again.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = secsync_telemetry::init("secsync", &config.sessions.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = secsync::run(config, listener, secsync_telemetry::shutdown_signal()).await;
    telemetry.flush().await;
    result
}
