//! Real processes for tests: the `secsync-persistence` binary, and a private PostgreSQL instance
//! (for tests that stop or restart the database; never the shared one).

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use secsync_rpc::v1::persistence_client::PersistenceClient;
use secsync_testkit::process::Service;
use tonic::transport::Channel;

/// A running `secsync-persistence`, killed on drop.
pub struct Persistence {
    service: Service,
    pub url: String,
}

impl Persistence {
    pub fn start(database_url: &str) -> Self {
        let service = Service::start(
            Path::new(env!("CARGO_BIN_EXE_secsync-persistence")),
            &["--listen", "127.0.0.1:0", "--database-url", database_url],
            &[("RUST_LOG", "info")],
        );
        let url = format!("http://127.0.0.1:{}", service.port);
        Self { service, url }
    }

    pub fn client(&self) -> PersistenceClient<Channel> {
        let channel = Channel::from_shared(self.url.clone())
            .unwrap()
            .connect_lazy();
        PersistenceClient::new(channel)
    }

    /// SIGTERM (a graceful shutdown); the exit status, `None` when it did not exit `within`.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.service.terminate_within(within)
    }
}

/// A private PostgreSQL cluster on a free port, owned by the `postgres` user (Postgres refuses
/// to run as root), removed on drop.
pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL installed under /usr/lib/postgresql")
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = std::env::temp_dir().join(format!(
            "secsync-pg-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        run_as_postgres(Command::new("chown").args(["postgres:postgres", dir.to_str().unwrap()]));
        let data = dir.join("data");
        let status = postgres_command(&bin.join("initdb"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "initdb failed");
        let port = free_port();
        let pg = Self { dir, bin, port };
        pg.ctl("start");
        pg
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn stop(&self) {
        self.ctl("stop");
    }

    pub fn start_again(&self) {
        self.ctl("start");
    }

    fn ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.to_str().unwrap()
        );
        let status = postgres_command(&self.bin.join("pg_ctl"))
            .args([
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-w",
                "-m",
                "fast",
            ])
            .args([
                "-o",
                &options,
                "-l",
                self.dir.join("log").to_str().unwrap(),
                action,
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "pg_ctl {action} failed");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = postgres_command(&self.bin.join("pg_ctl"))
            .args([
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postgres_command(program: &std::path::Path) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(program);
    command
}

fn run_as_postgres(command: &mut Command) {
    assert!(command.status().unwrap().success());
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007
}
