//! Where the load goes: `ws://` endpoints on loopback only, and the WebSocket plumbing.
//!
//! A target is never resolved through DNS: `localhost` means 127.0.0.1, anything else must be a
//! literal loopback address (127.0.0.0/8 or ::1). A bench that can be pointed at another machine
//! by a typo is a load test of someone else's server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures::StreamExt as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A WebSocket connection to the relay (plain TCP: loopback only, no TLS).
pub type Socket = WebSocketStream<TcpStream>;

/// What a connection mostly reads, which sizes its read buffer. tungstenite zero-fills the
/// buffer's free capacity before every read: with its default (128 KiB) a client receiving
/// small frames spent a third of the load generator's CPU in `memset`, on the cores the relay
/// under test shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// Frames of a few hundred bytes (updates, acknowledgements, small documents).
    Small,
    /// Whole large documents: fewer read calls per megabyte.
    Large,
}

impl Reads {
    fn buffer_size(self) -> usize {
        match self {
            Reads::Small => 8 * 1024,
            Reads::Large => 128 * 1024,
        }
    }
}

/// One relay endpoint given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The address connected to (always loopback).
    pub addr: SocketAddr,
    /// `ws://host:port` plus the path prefix, without a trailing slash.
    pub base: String,
}

impl Endpoint {
    /// `{base}/{doc}?sessionKey=bench&{query}`: the URL the JavaScript client would open.
    pub fn url(&self, doc: &str, query: &str) -> String {
        if query.is_empty() {
            format!("{}/{doc}?sessionKey=bench", self.base)
        } else {
            format!("{}/{doc}?sessionKey=bench&{query}", self.base)
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

/// Parses `ws://HOST[:PORT][/PREFIX]` and refuses anything that is not loopback.
pub fn parse_endpoint(text: &str) -> anyhow::Result<Endpoint> {
    let rest = text
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("{text}: only ws:// URLs on loopback are accepted"))?;
    if rest.contains(['?', '#', '@']) {
        bail!("{text}: no query, fragment or user info in a target URL");
    }
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| anyhow!("{text}: unclosed [ in the host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse().map_err(|_| {
            anyhow!("{text}: the host must be localhost or a literal loopback address (no DNS)")
        })?
    };
    if !ip.is_loopback() {
        bail!("{text}: {ip} is not a loopback address; this bench only loads this machine");
    }
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| anyhow!("{text}: bad port {p:?}"))?,
    };
    let prefix = path.trim_end_matches('/');
    let host_text = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    Ok(Endpoint {
        addr: SocketAddr::new(ip, port),
        base: format!("ws://{host_text}:{port}{prefix}"),
    })
}

/// Opens a WebSocket to `url` on `endpoint` (Nagle off, like a browser's WebSocket), optionally
/// from a given loopback source address.
pub async fn connect(
    endpoint: &Endpoint,
    url: &str,
    source: Option<IpAddr>,
    reads: Reads,
) -> anyhow::Result<Socket> {
    let stream = match source {
        None => TcpStream::connect(endpoint.addr).await?,
        Some(ip) => {
            let socket = match ip {
                IpAddr::V4(_) => TcpSocket::new_v4()?,
                IpAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding the source address {ip}"))?;
            socket.connect(endpoint.addr).await?
        }
    };
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default().read_buffer_size(reads.buffer_size());
    let (socket, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .with_context(|| format!("WebSocket handshake with {endpoint}"))?;
    Ok(socket)
}

/// Opens a connection for small frames and reads the first frame (the `document`, or a
/// refusal).
pub async fn open(endpoint: &Endpoint, url: &str) -> anyhow::Result<(Socket, String)> {
    let mut socket = connect(endpoint, url, None, Reads::Small).await?;
    let first = next_text(&mut socket, Duration::from_secs(30)).await?;
    if !first.starts_with("{\"type\":\"document\"") && !is_type(&first, "document") {
        bail!("the relay answered the connection with {first:.120}");
    }
    Ok((socket, first))
}

/// The next text frame; pings are answered by tungstenite as the stream is read.
pub async fn next_text(socket: &mut Socket, wait: Duration) -> anyhow::Result<String> {
    let read = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
                Some(Ok(Message::Close(frame))) => bail!("closed by the relay: {frame:?}"),
                Some(Ok(Message::Binary(_))) => bail!("unexpected binary frame"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("connection ended"),
            }
        }
    };
    tokio::time::timeout(wait, read)
        .await
        .map_err(|_| anyhow!("no frame from the relay within {wait:?}"))?
}

/// Whether a server frame's `type` is `kind` (a full parse; for rare frames).
pub fn is_type(text: &str, kind: &str) -> bool {
    secsync_protocol::json::parse(text)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str().map(|s| s == kind)))
        .unwrap_or(false)
}

/// `n` loopback source addresses 127.0.0.2, 127.0.0.3, … (each has its own ephemeral port
/// range, so more than ~28,000 connections to one port become possible).
pub fn source_addresses(first: u8, n: u8) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, first.saturating_add(i))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_accepted() {
        let e = parse_endpoint("ws://127.0.0.1:4000").unwrap();
        assert_eq!(e.addr, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(e.base, "ws://127.0.0.1:4000");
        assert_eq!(
            e.url("D1", "mode=complete"),
            "ws://127.0.0.1:4000/D1?sessionKey=bench&mode=complete"
        );
        let e = parse_endpoint("ws://localhost:9/sync/").unwrap();
        assert_eq!(e.base, "ws://127.0.0.1:9/sync");
        assert_eq!(e.url("D", ""), "ws://127.0.0.1:9/sync/D?sessionKey=bench");
        let e = parse_endpoint("ws://[::1]:4001").unwrap();
        assert_eq!(e.addr, "[::1]:4001".parse().unwrap());
        assert_eq!(e.base, "ws://[::1]:4001");
        assert_eq!(parse_endpoint("ws://127.8.9.10").unwrap().addr.port(), 80);
    }

    #[test]
    fn everything_else_is_refused() {
        for bad in [
            "wss://127.0.0.1:4000",
            "http://127.0.0.1:4000",
            "ws://10.0.0.1:4000",
            "ws://192.168.1.2:4000",
            "ws://8.8.8.8:80",
            "ws://example.com:4000",
            "ws://localhost.example.com:4000",
            "ws://[2001:db8::1]:4000",
            "ws://0.0.0.0:4000",
            "ws://127.0.0.1:0",
            "ws://127.0.0.1:99999",
            "ws://127.0.0.1:4000/?x=1",
            "ws://user@127.0.0.1:4000",
            "127.0.0.1:4000",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn source_addresses_count_up() {
        let a = source_addresses(2, 3);
        assert_eq!(
            a,
            ["127.0.0.2", "127.0.0.3", "127.0.0.4"].map(|s| s.parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn frame_types() {
        assert!(is_type(
            "{\"updates\":[],\"type\":\"document\"}",
            "document"
        ));
        assert!(!is_type("{\"type\":\"document-error\"}", "document"));
        assert!(!is_type("not json", "document"));
    }
}
