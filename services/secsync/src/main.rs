//! `secsync`: parse config, start logging, serve until SIGTERM, drain.

use clap::Parser as _;
use secsync::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = secsync_telemetry::init("secsync", &config.sessions.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = secsync::run(config, listener, secsync_telemetry::shutdown_signal()).await;
    telemetry.flush().await;
    result
}
