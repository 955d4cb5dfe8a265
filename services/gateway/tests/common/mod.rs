//! Test support for the gateway: the persistence service in-process on a fresh database, real
//! `secsync-gateway` processes, a private NATS server for tests that restart it, and a raw
//! WebSocket client that speaks frames.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::missing_panics_doc
)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use secsync_persistence::postgres::{PgBackend, PgSettings};
use secsync_persistence::CoreOptions;
use secsync_protocol::{parse_server_frame, ServerFrame};
use sqlx::Connection as _;
use tokio_tungstenite::tungstenite::Message;

pub const WAIT: Duration = Duration::from_secs(15);

pub fn admin_url() -> String {
    std::env::var("SECSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn nats_url() -> String {
    std::env::var("SECSYNC_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A fresh database and the persistence service on it (in-process, on a loopback port). The
/// database is dropped when this is dropped.
pub struct Persistence {
    pub url: String,
    pub db: String,
    db_url: String,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Persistence {
    pub async fn start() -> Self {
        let db = format!(
            "secsync_gw_{}_{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let base = admin_url().rsplit_once('/').unwrap().0.to_owned();
        let db_url = format!("{base}/{db}");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut persistence = Self {
            url: format!("http://{addr}"),
            db,
            db_url,
            addr,
            stop: None,
            server: None,
        };
        persistence.serve(listener);
        persistence
    }

    /// Stops serving (connections are refused) until [`Persistence::start_again`].
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }

    /// Serves again on the same address.
    pub fn start_again(&mut self) {
        let listener = std::net::TcpListener::bind(self.addr).unwrap();
        self.serve(listener);
    }

    fn serve(&mut self, listener: std::net::TcpListener) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let db_url = self.db_url.clone();
        // Its own runtime on its own thread, so it keeps serving while a test blocks and can be
        // stopped and started again.
        let server = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let backend = PgBackend::connect_lazy(&db_url, &PgSettings::default()).unwrap();
                let _ = secsync_persistence::grpc::serve(
                    listener,
                    backend,
                    CoreOptions::default(),
                    64 * 1024 * 1024,
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
            });
        });
        self.stop = Some(stop);
        self.server = Some(server);
    }
}

impl Drop for Persistence {
    fn drop(&mut self) {
        self.stop();
        let db = self.db.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join()
        .unwrap();
    }
}

/// A fresh database (no service on it), dropped when this is dropped.
pub struct Database {
    name: String,
    url: String,
}

impl Database {
    pub async fn create() -> Self {
        let name = format!(
            "secsync_gw_{}_{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let base = admin_url().rsplit_once('/').unwrap().0.to_owned();
        let url = format!("{base}/{name}");
        Self { name, url }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Its own runtime on its own thread: drop may run inside the test's runtime.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join()
        .unwrap();
    }
}

/// Persistence and one ready gateway on the shared NATS, the gateway started with `args`.
pub async fn one_gateway(args: &[&str]) -> (Persistence, Gateway) {
    let persistence = Persistence::start().await;
    let gateway = Gateway::start(&persistence.url, &nats_url(), args);
    gateway.ready().await;
    (persistence, gateway)
}

/// Two ready gateways on `persistence` and the shared NATS, both started with `args`.
pub async fn two_gateways(persistence: &Persistence, args: &[&str]) -> (Gateway, Gateway) {
    let a = Gateway::start(&persistence.url, &nats_url(), args);
    let b = Gateway::start(&persistence.url, &nats_url(), args);
    a.ready().await;
    b.ready().await;
    (a, b)
}

/// A `secsync-gateway` process, killed on drop.
pub struct Gateway {
    child: Child,
    pub port: u16,
    args: Vec<String>,
}

impl Gateway {
    pub fn start(persistence: &str, nats: &str, extra: &[&str]) -> Self {
        Self::start_on(persistence, nats, extra, 0)
    }

    pub fn start_on(persistence: &str, nats: &str, extra: &[&str], port: u16) -> Self {
        Self::start_with_env(persistence, nats, extra, port, &[])
    }

    /// Starts with extra environment variables (e.g. allocator settings for the benchmark).
    pub fn start_with_env(
        persistence: &str,
        nats: &str,
        extra: &[&str],
        port: u16,
        env: &[(String, String)],
    ) -> Self {
        Self::launch(&[], persistence, nats, extra, port, env)
    }

    /// Starts through `wrapper` (a program and its arguments that end by running the gateway
    /// command appended to them, e.g. in a namespace of its own).
    pub fn start_wrapped(
        wrapper: &[String],
        persistence: &str,
        nats: &str,
        extra: &[&str],
    ) -> Self {
        Self::launch(wrapper, persistence, nats, extra, 0, &[])
    }

    fn launch(
        wrapper: &[String],
        persistence: &str,
        nats: &str,
        extra: &[&str],
        port: u16,
        env: &[(String, String)],
    ) -> Self {
        let mut args: Vec<String> = vec![
            "--persistence".into(),
            persistence.into(),
            "--nats".into(),
            nats.into(),
            "--head-check-seconds".into(),
            "1".into(),
        ];
        if !extra.contains(&"--auth") {
            args.extend(["--auth".into(), "open".into()]);
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let binary = env!("CARGO_BIN_EXE_secsync-gateway");
        let mut command = match wrapper.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let mut child = command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(&args)
            .env("SECSYNC_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start secsync-gateway");
        let port = read_port(child.stdout.take().unwrap());
        Self { child, port, args }
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if http_status(self.port, "/readyz").await == Some(200) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "gateway not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_port(stdout: std::process::ChildStdout) -> u16 {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent {
                if let Some(start) = line.find("\"listen\":\"127.0.0.1:") {
                    let rest = &line[start + "\"listen\":\"127.0.0.1:".len()..];
                    if let Some(port) = rest.split('"').next().and_then(|p| p.parse::<u16>().ok()) {
                        let _ = tx.send(port);
                        sent = true;
                    }
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("listening address in the log")
}

/// A plain HTTP GET status (health endpoints).
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    text.split(' ').nth(1)?.parse().ok()
}

/// A plain HTTP GET with extra header lines (e.g. a WebSocket upgrade); the status.
pub async fn http_get(port: u16, path: &str, headers: &[&str]) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    // One response: its status line is all that is needed.
    let mut response = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, stream.read(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response[..n]);
    text.split(' ').nth(1)?.parse().ok()
}

/// A client frame as a browser sends it: masked, `fin` or not, with the given opcode.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0x13, 0xc4, 0x81];
    let mut out = vec![if fin { 0x80 | opcode } else { opcode }];
    match payload.len() {
        n if n < 126 => out.push(0x80 | u8::try_from(n).unwrap()),
        n => {
            out.push(0xFE); // masked, 16-bit length
            out.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A plain HTTP POST with extra header lines (e.g. `Authorization: Bearer …`); the status.
pub async fn http_post(port: u16, path: &str, headers: &[&str], body: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    text.split(' ').nth(1)?.parse().ok()
}

/// A private NATS server on a free port (for tests that stop it), killed on drop.
pub struct PrivateNats {
    child: Option<Child>,
    pub port: u16,
}

impl PrivateNats {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut nats = Self { child: None, port };
        nats.start_again();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn start_again(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.stop();
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw WebSocket connection to a document.
pub struct Ws {
    stream: WsStream,
    /// Close code received, if the server closed.
    pub closed: Option<u16>,
}

impl Ws {
    /// Connects to `{base}/{doc}?sessionKey=k&{extra}`; the caller reads the first frame.
    pub async fn connect(base: &str, doc: &str, extra: &str) -> Self {
        Self::connect_url(format!("{base}/{doc}?sessionKey=k{extra}")).await
    }

    async fn connect_url(url: String) -> Self {
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        Self {
            stream,
            closed: None,
        }
    }

    /// Connects to `{base}/{doc}` with `key` as the session key (a token, percent-encoded
    /// here); the caller reads the first frame.
    pub async fn connect_key(base: &str, doc: &str, key: &str) -> Self {
        let key: String = key
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        Self::connect_url(format!("{base}/{doc}?sessionKey={key}")).await
    }

    /// Like [`Ws::connect`], from the loopback address `source` (one address has only ~28,000
    /// ephemeral ports towards one server port).
    pub async fn connect_from(base: &str, doc: &str, source: std::net::IpAddr) -> Self {
        let url = format!("{base}/{doc}?sessionKey=k");
        let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let tcp = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let (stream, _) =
            tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
                .await
                .expect("connect");
        Self {
            stream,
            closed: None,
        }
    }

    /// Reads (and so answers pings) until the connection ends; returns the close code.
    pub async fn hold(mut self) -> Option<u16> {
        while let Some(message) = self.stream.next().await {
            match message {
                Ok(Message::Close(frame)) => {
                    self.closed = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        self.closed
    }

    /// Reads until `count` pings have arrived (the library answers each with a pong); panics
    /// on anything else but a pong.
    pub async fn pings(&mut self, count: usize) {
        let mut seen = 0;
        while seen < count {
            let message = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("timed out waiting for a ping");
            match message {
                Some(Ok(Message::Ping(_))) => seen += 1,
                Some(Ok(Message::Pong(_))) => {}
                other => panic!("expected a ping, got {other:?}"),
            }
        }
    }

    /// Connects and expects a `document` frame first.
    pub async fn open(base: &str, doc: &str) -> (Self, ServerFrame) {
        let mut ws = Self::connect(base, doc, "").await;
        let first = ws.next().await.expect("first frame");
        assert!(matches!(first, ServerFrame::Document { .. }), "{first:?}");
        (ws, first)
    }

    pub async fn send(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.stream
            .send(Message::binary(bytes))
            .await
            .expect("send");
    }

    /// The next text frame within [`WAIT`]; `None` when the connection closed.
    pub async fn next(&mut self) -> Option<ServerFrame> {
        self.next_text()
            .await
            .map(|t| parse_server_frame(&t).expect("server frame"))
    }

    pub async fn next_text(&mut self) -> Option<String> {
        loop {
            let message = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("timed out waiting for a frame");
            match message {
                Some(Ok(Message::Text(text))) => return Some(text.to_string()),
                Some(Ok(Message::Close(frame))) => {
                    self.closed = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    return None;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Waits for the server to close; returns its close code.
    pub async fn closed(&mut self) -> Option<u16> {
        while self.next_text().await.is_some() {}
        self.closed
    }
}

/// An author with a real signing key and the document key, building frames with the Rust
/// client library.
pub struct Signer {
    pub key: ed25519_dalek::SigningKey,
    pub pub_key: String,
    doc_key: secsync_client::DocumentKey,
}

impl Signer {
    pub fn new(seed: u8) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let pub_key = secsync_client::frames::public_key_of(&key)
            .as_str()
            .to_owned();
        let doc_key = secsync_client::DocumentKey::from_bytes([7; 32]);
        Self {
            key,
            pub_key,
            doc_key,
        }
    }

    /// A document's first snapshot.
    pub fn first_snapshot(&self, doc: &str, id: &str) -> String {
        self.large_first_snapshot(doc, id, b"first snapshot")
    }

    /// A document's first snapshot of the given plaintext.
    pub fn large_first_snapshot(&self, doc: &str, id: &str, content: &[u8]) -> String {
        let spec = secsync_client::frames::SnapshotSpec {
            doc_id: &secsync_protocol::DocumentId::parse(doc).unwrap(),
            snapshot_id: &secsync_protocol::SnapshotId::parse(id).unwrap(),
            parent: None,
            parent_snapshot_update_clocks: &std::collections::BTreeMap::new(),
        };
        secsync_client::frames::build_snapshot(&spec, content, &self.doc_key, &self.key)
            .unwrap()
            .text
    }

    pub fn update(&self, doc: &str, snapshot: &str, clock: u64) -> String {
        self.large_update(doc, snapshot, clock, 16)
    }

    /// An update whose plaintext is `bytes` long.
    pub fn large_update(&self, doc: &str, snapshot: &str, clock: u64, bytes: usize) -> String {
        secsync_client::frames::build_update(
            &secsync_protocol::DocumentId::parse(doc).unwrap(),
            &secsync_protocol::SnapshotId::parse(snapshot).unwrap(),
            secsync_protocol::Clock::new(clock).unwrap(),
            &vec![b'u'; bytes],
            &self.doc_key,
            &self.key,
        )
        .unwrap()
    }

    pub fn ephemeral(&self, doc: &str, n: u64) -> String {
        secsync_client::frames::build_ephemeral(
            &secsync_protocol::DocumentId::parse(doc).unwrap(),
            &n.to_le_bytes(),
            &self.doc_key,
            &self.key,
        )
        .unwrap()
    }
}

/// A fresh document id.
pub fn doc_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// The clock of a relayed update frame.
pub fn update_clock(frame: &ServerFrame) -> Option<(String, u64)> {
    let ServerFrame::Update(text) = frame else {
        return None;
    };
    match secsync_protocol::parse_client_frame(text, secsync_protocol::ParseOptions::default()) {
        Ok(secsync_protocol::ClientFrame::Update(u)) => {
            Some((u.signed.pub_key().as_str().to_owned(), u.clock.get()))
        }
        _ => None,
    }
}

/// A WebSocket client that never sends anything after its handshake, not even a pong (the
/// WebSocket library answers pings by itself): reads the server's frames raw.
pub struct SilentWs {
    stream: tokio::net::TcpStream,
    buffer: Vec<u8>,
    /// A fragmented message's opcode and data so far.
    partial: Option<(u8, Vec<u8>)>,
}

impl SilentWs {
    pub async fn connect(port: u16, doc: &str) -> Self {
        use tokio::io::AsyncWriteExt as _;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let request = format!(
            "GET /{doc}?sessionKey=k HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut ws = Self {
            stream,
            buffer: Vec::new(),
            partial: None,
        };
        let end = loop {
            if let Some(end) = ws.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            assert!(ws.read_more().await, "closed during the handshake");
        };
        let head = String::from_utf8_lossy(&ws.buffer[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        ws.buffer.drain(..end);
        ws
    }

    /// Writes raw bytes (frames made with [`masked_frame`], or broken ones).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt as _;
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn read_more(&mut self) -> bool {
        use tokio::io::AsyncReadExt as _;
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("timed out waiting for the server")
            .unwrap_or(0);
        self.buffer.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next message or control frame from the server, as (opcode, payload): the fragments
    /// of a message (the gateway sends a large `document` in pieces) are joined, and control
    /// frames between them come out as they arrive. `None` once the socket closed.
    pub async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            let Some((fin, opcode, payload)) = self.raw_frame().await else {
                assert!(self.partial.is_none(), "closed inside a fragmented message");
                return None;
            };
            match (opcode, self.partial.as_mut()) {
                (8.., _) => return Some((opcode, payload)),
                (0, Some((_, data))) => data.extend_from_slice(&payload),
                (0, None) => panic!("a continuation frame outside a message"),
                (_, Some(_)) => panic!("a new message inside a fragmented one"),
                (_, None) => self.partial = Some((opcode, payload)),
            }
            if fin {
                return self.partial.take();
            }
        }
    }

    async fn raw_frame(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        loop {
            if let Some(frame) = self.parse() {
                return Some(frame);
            }
            if !self.read_more().await {
                return None;
            }
        }
    }

    fn parse(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        let b = &self.buffer;
        if b.len() < 2 {
            return None;
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = b[0] & 0x0f;
        let (length, header) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => (
                usize::try_from(u64::from_be_bytes(b[2..10].try_into().unwrap())).unwrap(),
                10,
            ),
            126 | 127 => return None,
            n => (usize::from(n), 2),
        };
        if b.len() < header + length {
            return None;
        }
        let payload = b[header..header + length].to_vec();
        self.buffer.drain(..header + length);
        Some((fin, opcode, payload))
    }
}
