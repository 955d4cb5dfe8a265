//! A service binary as a real process: started on `127.0.0.1:0` with JSON logs, its port read
//! from the log line that names its listening address, every output line kept.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running service, killed on drop.
#[derive(Debug)]
pub struct Service {
    child: Child,
    pub port: u16,
    output: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts `binary` with `args` and `env` (plus JSON logs); waits for its listening address.
    ///
    /// # Panics
    /// When the process does not start or names no address within 30 s.
    pub fn start(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(binary)
            .args(args)
            .env("SECSYNC_LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        let output = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        for stream in streams {
            let (output, port_tx) = (output.clone(), port_tx.clone());
            // Read to the end so the process never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Some(port) = listening_port(&line) {
                        let _ = port_tx.send(port);
                    }
                    output.lock().expect("output lock").push(line);
                }
            });
        }
        let port = port_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{} named no listening address", binary.display()));
        Self {
            child,
            port,
            output,
        }
    }

    /// Every line the process wrote so far (stdout and stderr).
    ///
    /// # Panics
    /// When a reader thread panicked.
    pub fn output(&self) -> Vec<String> {
        self.output.lock().expect("output lock").clone()
    }

    /// SIGTERM, then waits for the exit (so buffered telemetry is flushed).
    ///
    /// # Panics
    /// When the process cannot be waited for.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().expect("wait for the process")
    }

    /// SIGTERM, then waits at most `within` for the exit: its status, or `None` when the
    /// process did not exit in time (it is killed then), so that a shutdown that hangs fails a
    /// test instead of stalling it.
    ///
    /// # Panics
    /// When the process cannot be waited for.
    pub fn terminate_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        // A thread runs `kill -KILL` once the deadline passes, unless told the wait returned.
        let (exited, notice) = std::sync::mpsc::channel::<()>();
        let killer = std::thread::spawn(move || {
            let late = notice.recv_timeout(within).is_err();
            if late {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
            late
        });
        let status = self.child.wait().expect("wait for the process");
        let _ = exited.send(());
        let late = killer.join().expect("killer thread");
        (!late).then_some(status)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of a JSON log line's `"listen":"127.0.0.1:PORT"` field.
pub fn listening_port(line: &str) -> Option<u16> {
    let marker = "\"listen\":\"127.0.0.1:";
    let start = line.find(marker)? + marker.len();
    line[start..].split('"').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_port_of_a_listen_field() {
        let line = r#"{"level":"INFO","fields":{"message":"starting","listen":"127.0.0.1:4711"}}"#;
        assert_eq!(listening_port(line), Some(4711));
        assert_eq!(listening_port(r#"{"listen":"0.0.0.0:1"}"#), None);
        assert_eq!(listening_port("no json"), None);
    }
}
