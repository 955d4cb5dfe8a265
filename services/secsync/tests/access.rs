//! Access control in the embedded binary: the same flags as the gateway; a revocation travels
//! over the in-process bus; no token ever reaches the log.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc,
    clippy::disallowed_methods
)]

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt as _;
use secsync_testkit::process::Service;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "an-hs256-secret-of-at-least-32-bytes";
const ADMIN: &str = "embedded-admin-token";

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "secsync-embedded-access-{:016x}",
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn token(doc: &str, jti: &str, access: &str, exp: u64) -> String {
    let claims = serde_json::json!({"doc": doc, "access": access, "exp": exp, "jti": jti});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects; returns the socket and the type of its first frame.
async fn connect(port: u16, doc: &str, key: &str) -> (Ws, String) {
    let url = format!("ws://127.0.0.1:{port}/{doc}?sessionKey={key}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let first = next_text(&mut ws).await.expect("a first frame");
    let value: serde_json::Value = serde_json::from_str(&first).unwrap();
    (ws, value["type"].as_str().unwrap().to_owned())
}

async fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("timed out")
        {
            Some(Ok(Message::Text(text))) => return Some(text.to_string()),
            Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// Waits for the close; its code.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("timed out")
        {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    }
}

async fn post_revoke(port: u16, body: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "POST /admin/revoke HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_and_revocation_in_one_process() {
    let dir = temp_dir();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    std::fs::write(dir.join("admin"), ADMIN).unwrap();
    let args = [
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--data-dir".to_owned(),
        dir.join("data").display().to_string(),
        "--auth".to_owned(),
        "jwt".to_owned(),
        "--jwt-key-file".to_owned(),
        dir.join("secret").display().to_string(),
        "--admin-token-file".to_owned(),
        dir.join("admin").display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Service::start(
        env!("CARGO_BIN_EXE_secsync").as_ref(),
        &args,
        &[("RUST_LOG", "debug")],
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let alice = token("doc-1", "alice", "read-write", exp);
    let bob = token("doc-1", "bob", "read", exp);
    let (mut a, first) = connect(relay.port, "doc-1", &alice).await;
    assert_eq!(first, "document");
    let (mut b, first) = connect(relay.port, "doc-1", &bob).await;
    assert_eq!(first, "document");
    let (_, first) = connect(relay.port, "doc-2", &alice).await;
    assert_eq!(first, "unauthorized");

    assert!(post_revoke(relay.port, r#"{"sessionId":"alice"}"#)
        .await
        .starts_with("HTTP/1.1 202"));
    assert_eq!(close_code(&mut a).await, Some(4003));
    let (_, first) = connect(relay.port, "doc-1", &alice).await;
    assert_eq!(first, "unauthorized");
    assert!(post_revoke(relay.port, r#"{"documentId":"doc-1"}"#)
        .await
        .starts_with("HTTP/1.1 202"));
    assert_eq!(close_code(&mut b).await, Some(4003));

    // Session keys are tokens here: none of them may reach the log, even at debug level.
    let output = relay.output();
    assert!(!output.is_empty());
    for line in output {
        assert!(
            !line.contains(&alice) && !line.contains(&bob),
            "a token in the log: {line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
