//! `secsync`: parse config, start logging, serve until SIGTERM, drain.

use clap::Parser as _;
use secsync::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    secsync_telemetry::init(&config.sessions.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    secsync::run(config, listener, secsync_telemetry::shutdown_signal()).await
}
