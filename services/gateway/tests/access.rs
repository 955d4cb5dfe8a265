//! Access control against real processes: two `secsync-gateway`s on one persistence service and
//! NATS, in jwt and callback mode; expiry and revocation close sockets on both gateways; the
//! origin allow-list and the per-address limit refuse at the upgrade.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc,
    clippy::disallowed_methods
)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    doc_id, http_post, nats_url, one_gateway, two_gateways, Gateway, Persistence, Signer, Ws, WAIT,
};
use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secsync_protocol::ServerFrame;
use serde_json::json;

const EXPIRED: u16 = 4001;
const REVOKED: u16 = 4003;
const ADMIN_TOKEN: &str = "admin-token-for-tests";

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("secsync-access-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        // Written beside and renamed: the gateway never reads a half-written file.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An Ed25519 issuer: its private key and its public key in PEM.
struct EdIssuer {
    key: EncodingKey,
    public_pem: String,
}

impl EdIssuer {
    fn new(seed: u8) -> Self {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let der = signing.to_pkcs8_der().unwrap();
        let public_pem = signing
            .verifying_key()
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .unwrap();
        Self {
            key: EncodingKey::from_ed_der(der.as_bytes()),
            public_pem,
        }
    }

    fn token(&self, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &self.key).unwrap()
    }
}

fn hs_token(secret: &[u8], kid: Option<&str>, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn claims(doc: &str, access: &str, exp: u64) -> serde_json::Value {
    json!({"doc": doc, "access": access, "exp": exp, "iat": now()})
}

/// The first frame of a connection with `key`.
async fn first(base: &str, doc: &str, key: &str) -> (Ws, ServerFrame) {
    let mut ws = Ws::connect_key(base, doc, key).await;
    let frame = ws.next().await.expect("a first frame");
    (ws, frame)
}

/// Opens and expects `document`.
async fn open(base: &str, doc: &str, key: &str) -> Ws {
    let (ws, frame) = first(base, doc, key).await;
    assert!(matches!(frame, ServerFrame::Document { .. }), "{frame:?}");
    ws
}

/// Expects `unauthorized` and a close.
async fn refused(base: &str, doc: &str, key: &str) {
    let (mut ws, frame) = first(base, doc, key).await;
    assert_eq!(frame, ServerFrame::Unauthorized);
    assert_eq!(ws.closed().await, Some(1000));
}

/// `writer` creates the document's first snapshot; it is acknowledged and reaches `reader`.
async fn first_snapshot_reaches(writer: &mut Ws, reader: &mut Ws, doc: &str) {
    writer.send(&Signer::new(1).first_snapshot(doc, "S1")).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
    assert!(matches!(
        reader.next().await,
        Some(ServerFrame::Snapshot(_))
    ));
}

/// Persistence and one ready gateway in jwt mode with this key file.
async fn jwt_gateway(keys: &Path) -> (Persistence, Gateway) {
    one_gateway(&["--auth", "jwt", "--jwt-key-file", path(keys)]).await
}

fn admin_args(dir: &TempDir) -> String {
    dir.file("admin-token", &format!("{ADMIN_TOKEN}\n"))
        .display()
        .to_string()
}

async fn revoke(port: u16, body: &str) -> Option<u16> {
    http_post(
        port,
        "/admin/revoke",
        &[&format!("Authorization: Bearer {ADMIN_TOKEN}")],
        body,
    )
    .await
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_are_checked_on_both_gateways() {
    let dir = TempDir::new();
    let issuer = EdIssuer::new(3);
    let keys = dir.file("ed.pem", &issuer.public_pem);
    let persistence = Persistence::start().await;
    let args = ["--auth", "jwt", "--jwt-key-file", path(&keys)];
    let (a, b) = two_gateways(&persistence, &args).await;
    let doc = doc_id("jwt");
    let later = now() + 3600;

    // Read-only on B, read-write on A: the reader loads, receives, and may send ephemeral
    // messages, but a write is answered `unauthorized` and closes.
    let mut reader = open(&b.url(), &doc, &issuer.token(&claims(&doc, "read", later))).await;
    let mut writer = open(
        &a.url(),
        &doc,
        &issuer.token(&claims(&doc, "read-write", later)),
    )
    .await;
    first_snapshot_reaches(&mut writer, &mut reader, &doc).await;
    let reader_signer = Signer::new(2);
    reader.send(&reader_signer.ephemeral(&doc, 1)).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::EphemeralMessage(_))
    ));
    reader.send(&reader_signer.update(&doc, "S1", 0)).await;
    assert_eq!(reader.next().await, Some(ServerFrame::Unauthorized));
    assert_eq!(reader.closed().await, Some(1000));
    let mut reader = open(&b.url(), &doc, &issuer.token(&claims(&doc, "read", later))).await;
    reader.send(&reader_signer.first_snapshot(&doc, "S9")).await;
    assert_eq!(reader.next().await, Some(ServerFrame::Unauthorized));

    // A prefix grants every document under it.
    let prefixed = format!("{doc}/child");
    let token = issuer
        .token(&json!({"doc_prefix": format!("{doc}/"), "access": "read-write", "exp": later}));
    open(&a.url(), &prefixed, &token).await;
    refused(&a.url(), &doc, &token).await;

    // Expired, another document, tampered, another key, no token, bad claims: refused.
    refused(
        &b.url(),
        &doc,
        &issuer.token(&claims(&doc, "read-write", now() - 10)),
    )
    .await;
    refused(
        &a.url(),
        &doc,
        &issuer.token(&claims("another", "read-write", later)),
    )
    .await;
    let good = issuer.token(&claims(&doc, "read", later));
    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let forged_claims = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(&doc, "read-write", later),
        &EncodingKey::from_secret(b"x"),
    )
    .unwrap();
    let forged_payload = forged_claims.split('.').nth(1).unwrap();
    refused(
        &a.url(),
        &doc,
        &format!("{head}.{forged_payload}.{signature}"),
    )
    .await;
    refused(
        &b.url(),
        &doc,
        &EdIssuer::new(4).token(&claims(&doc, "read-write", later)),
    )
    .await;
    refused(&a.url(), &doc, "k").await;
    refused(
        &a.url(),
        &doc,
        &issuer.token(&json!({"doc": doc, "access": "admin", "exp": later})),
    )
    .await;
    // HS256 signed with the Ed25519 public key as secret (algorithm confusion).
    refused(
        &a.url(),
        &doc,
        &hs_token(
            issuer.public_pem.as_bytes(),
            None,
            &claims(&doc, "read-write", later),
        ),
    )
    .await;
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_rotate_without_a_restart() {
    let dir = TempDir::new();
    let (old, new) = ([1u8; 32], [2u8; 32]);
    let b64 = |k: &[u8]| secsync_protocol::b64::encode(k);
    let jwks = |keys: &[(&str, &[u8])]| {
        let keys: Vec<_> = keys
            .iter()
            .map(|(kid, k)| json!({"kty": "oct", "kid": kid, "k": b64(k)}))
            .collect();
        json!({ "keys": keys }).to_string()
    };
    let file = dir.file("jwks.json", &jwks(&[("old", &old)]));
    let (_persistence, gateway) = jwt_gateway(&file).await;
    let doc = doc_id("jwks");
    let c = claims(&doc, "read-write", now() + 3600);
    open(&gateway.url(), &doc, &hs_token(&old, Some("old"), &c)).await;
    refused(&gateway.url(), &doc, &hs_token(&new, Some("new"), &c)).await;
    // Rotate: the new key joins, the old one leaves.
    dir.file("jwks.json", &jwks(&[("new", &new)]));
    open(&gateway.url(), &doc, &hs_token(&new, Some("new"), &c)).await;
    refused(&gateway.url(), &doc, &hs_token(&old, Some("old"), &c)).await;
    // A file that no longer parses keeps the keys that worked.
    dir.file("jwks.json", "{ not json");
    open(&gateway.url(), &doc, &hs_token(&new, Some("new"), &c)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_its_socket() {
    let dir = TempDir::new();
    let keys = dir.file("secret", std::str::from_utf8(&[b'k'; 40]).unwrap());
    let (_persistence, gateway) = jwt_gateway(&keys).await;
    let doc = doc_id("expiry");
    let short = hs_token(&[b'k'; 40], None, &claims(&doc, "read-write", now() + 2));
    let long = hs_token(&[b'k'; 40], None, &claims(&doc, "read-write", now() + 3600));
    let mut expiring = open(&gateway.url(), &doc, &short).await;
    let mut staying = open(&gateway.url(), &doc, &long).await;
    // Waits for the close event itself (up to WAIT), not for a time.
    assert_eq!(expiring.closed().await, Some(EXPIRED));
    let signer = Signer::new(1);
    staying.send(&signer.first_snapshot(&doc, "S1")).await;
    assert!(matches!(
        staying.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_close_sockets_on_every_gateway() {
    let dir = TempDir::new();
    let secret = [b's'; 32];
    let keys = dir.file("secret", std::str::from_utf8(&secret).unwrap());
    let admin = admin_args(&dir);
    let persistence = Persistence::start().await;
    let args = [
        "--auth",
        "jwt",
        "--jwt-key-file",
        path(&keys),
        "--admin-token-file",
        &admin,
    ];
    let (a, b) = two_gateways(&persistence, &args).await;
    let doc = doc_id("revoke");
    let token = |jti: &str, iat: u64| {
        hs_token(
            &secret,
            None,
            &json!({"doc": doc, "access": "read-write", "exp": now() + 3600, "jti": jti, "iat": iat}),
        )
    };
    let mut revoked_a = open(&a.url(), &doc, &token("alice", now())).await;
    let mut revoked_b = open(&b.url(), &doc, &token("alice", now())).await;
    let mut other_b = open(&b.url(), &doc, &token("bob", now())).await;
    let mut writer = open(&a.url(), &doc, &token("writer", now())).await;

    // The admin endpoint wants its token.
    assert_eq!(
        http_post(a.port, "/admin/revoke", &[], r#"{"sessionId":"alice"}"#).await,
        Some(401)
    );
    assert_eq!(
        http_post(
            a.port,
            "/admin/revoke",
            &["Authorization: Bearer wrong"],
            r#"{"sessionId":"alice"}"#
        )
        .await,
        Some(401)
    );
    assert_eq!(revoke(a.port, r#"{"nothing":1}"#).await, Some(400));

    // By id, through A: both of alice's sockets close, on A and on B.
    assert_eq!(revoke(a.port, r#"{"sessionId":"alice"}"#).await, Some(202));
    assert_eq!(revoked_a.closed().await, Some(REVOKED));
    assert_eq!(revoked_b.closed().await, Some(REVOKED));
    // The others go on: a write still reaches bob on B.
    first_snapshot_reaches(&mut writer, &mut other_b, &doc).await;
    // The revoked id stays out, on both gateways.
    refused(&a.url(), &doc, &token("alice", now())).await;
    refused(&b.url(), &doc, &token("alice", now())).await;

    // By document, through B: every socket of it closes, and tokens issued before stay out.
    let issued_before = now() - 1;
    assert_eq!(
        revoke(b.port, &json!({"documentId": doc}).to_string()).await,
        Some(202)
    );
    assert_eq!(other_b.closed().await, Some(REVOKED));
    assert_eq!(writer.closed().await, Some(REVOKED));
    refused(&a.url(), &doc, &token("carol", issued_before)).await;
    // A token issued after the revocation is welcome.
    open(&b.url(), &doc, &token("carol", now() + 2)).await;
}

/// The application's access callback, in the test: decides by the session key.
async fn callback_app(calls: Arc<AtomicUsize>) -> u16 {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/check",
        post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let answer = match body["sessionKey"].as_str().unwrap_or_default() {
                    "rw" => json!({"allow": true, "access": "read-write", "ttlSeconds": 60}),
                    "ro" => json!({"allow": true, "access": "read", "ttlSeconds": 60}),
                    "slow" => {
                        // Longer than the gateway's timeout (the app is slow, not the test).
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        json!({"allow": true})
                    }
                    "revocable" => json!({"allow": true, "revocationId": "r1"}),
                    _ => json!({"allow": false, "ttlSeconds": 60}),
                };
                axum::Json(answer)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_decides_with_cache_timeout_and_fail_closed() {
    let calls = Arc::new(AtomicUsize::new(0));
    let port = callback_app(calls.clone()).await;
    let dir = TempDir::new();
    let admin = admin_args(&dir);
    let persistence = Persistence::start().await;
    let url = format!("http://127.0.0.1:{port}/check");
    let args = [
        "--auth",
        "callback",
        "--auth-callback-url",
        &url,
        "--auth-callback-timeout-ms",
        "300",
        "--admin-token-file",
        &admin,
    ];
    let (a, b) = two_gateways(&persistence, &args).await;
    let doc = doc_id("callback");

    let mut writer = open(&a.url(), &doc, "rw").await;
    open(&a.url(), &doc, "rw").await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the second decision comes from the cache"
    );
    let mut reader = open(&b.url(), &doc, "ro").await;
    first_snapshot_reaches(&mut writer, &mut reader, &doc).await;
    reader.send(&Signer::new(2).update(&doc, "S1", 0)).await;
    assert_eq!(reader.next().await, Some(ServerFrame::Unauthorized));

    refused(&a.url(), &doc, "nobody").await;
    refused(&b.url(), &doc, "slow").await;

    // A revocation id from the callback revokes like a token's jti.
    let mut revocable = open(&b.url(), &doc, "revocable").await;
    assert_eq!(revoke(a.port, r#"{"sessionId":"r1"}"#).await, Some(202));
    assert_eq!(revocable.closed().await, Some(REVOKED));

    // The application unreachable: denied (fail closed).
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let unreachable = Gateway::start(
        &persistence.url,
        &nats_url(),
        &[
            "--auth",
            "callback",
            "--auth-callback-url",
            &format!("http://127.0.0.1:{dead}/check"),
        ],
    );
    unreachable.ready().await;
    refused(&unreachable.url(), &doc, "rw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_and_per_address_limits_are_refused_at_the_upgrade() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Error;
    let (_persistence, gateway) = one_gateway(&[
        "--allowed-origins",
        "https://app.example.com,https://other.example.com",
        "--max-connections-per-ip",
        "2",
    ])
    .await;
    // Without --admin-token-file there is no admin endpoint.
    assert_eq!(
        http_post(gateway.port, "/admin/revoke", &[], r#"{"sessionId":"x"}"#).await,
        Some(404)
    );
    let doc = doc_id("admission");
    let connect = |origin: Option<&'static str>| {
        let mut request = format!("{}/{doc}?sessionKey=k", gateway.url())
            .into_client_request()
            .unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("Origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
    };
    match connect(Some("https://evil.example.com")).await {
        Err(Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    let first = connect(Some("https://app.example.com")).await.unwrap();
    let second = connect(None).await.unwrap();
    match connect(Some("https://other.example.com")).await {
        Err(Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // A closed connection gives its place back (waits for that, with a deadline).
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match connect(Some("https://other.example.com")).await {
            Ok(_) => break,
            Err(Error::Http(response)) if response.status() == 429 => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "place not given back"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("{other}"),
        }
    }
    drop(second);
}
