//! Real processes for tests: the `secsync-persistence` binary, and a private PostgreSQL instance
//! (for tests that stop or restart the database; never the shared one).

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use secsync_rpc::v1::persistence_client::PersistenceClient;
use tonic::transport::Channel;

/// A running `secsync-persistence`, killed on drop.
pub struct Persistence {
    child: Option<Child>,
    pub url: String,
}

impl Persistence {
    pub fn start(database_url: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_secsync-persistence"))
            .args(["--listen", "127.0.0.1:0", "--database-url", database_url])
            .env("SECSYNC_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start secsync-persistence");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Read the bound address from the log, then keep draining so the pipe never fills.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(port) = listen_port(&line) {
                        let _ = tx.send(port);
                        sent = true;
                    }
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("secsync-persistence reported its address");
        Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub fn client(&self) -> PersistenceClient<Channel> {
        let channel = Channel::from_shared(self.url.clone())
            .unwrap()
            .connect_lazy();
        PersistenceClient::new(channel)
    }
}

impl Persistence {
    /// Sends SIGTERM (a graceful shutdown) and waits up to `within` for the process to exit;
    /// its exit status, `None` when it did not exit in time (it is killed on drop then).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let status = child.wait();
            let _ = tx.send(());
            status
        });
        let exited = rx.recv_timeout(within).is_ok();
        if !exited {
            // The waiter returns once the process is gone; `kill` by pid ends it.
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        let status = waiter.join().expect("waiter thread");
        exited.then(|| status.expect("wait for secsync-persistence"))
    }
}

impl Drop for Persistence {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn listen_port(line: &str) -> Option<u16> {
    let start = line.find("\"listen\":\"127.0.0.1:")? + "\"listen\":\"127.0.0.1:".len();
    line[start..].split('"').next()?.parse().ok()
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
