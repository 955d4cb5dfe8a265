//! The gateway's WebSocket layer (RFC 6455, server side, no extensions): the upgrade handshake,
//! and a connection that reads client messages and writes queued frames.
//!
//! Our own rather than tungstenite's because of what an idle connection keeps. tungstenite
//! copies every frame into a write buffer and keeps that buffer at the size of the largest
//! frame it ever sent, and allocates its read buffer up front: a client that once loaded a
//! 4 MB document kept 4 MB, and every connection to a document with a snapshot kept tens of KiB
//! (BENCHMARKS.md). Here frames are written straight from their shared bytes (a header and the
//! payload in one vectored write, several frames per write), and nothing is allocated between
//! messages: reads go through a buffer on the stack, and only the bytes of a frame that spans
//! reads are kept until it is complete.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{Buf as _, Bytes, BytesMut};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The GUID of RFC 6455 section 1.3, hashed with the client's key into the accept header.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Bytes read per read call into the stack buffer.
const READ_CHUNK: usize = 4096;

/// Frames handed to one vectored write at most (two slices each: header and payload).
const WRITE_BATCH: usize = 32;

/// Close codes of the WebSocket layer itself.
pub mod close {
    /// The client broke the framing rules (unmasked frame, reserved bits, bad fragmentation...).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not UTF-8.
    pub const INVALID_TEXT: u16 = 1007;
    /// A message over the configured size limit.
    pub const TOO_BIG: u16 = 1009;
}

/// A request to upgrade to a WebSocket, taken from the HTTP request.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is not secret, but nothing reads it in logs.
        f.debug_struct("Upgrade").finish_non_exhaustive()
    }
}

/// Why an upgrade request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    #[error("not a WebSocket upgrade")]
    NotUpgrade,
    #[error("unsupported WebSocket version (13 is)")]
    Version,
    #[error("malformed WebSocket upgrade request")]
    Malformed,
}

impl UpgradeError {
    /// The HTTP answer to a refused upgrade.
    pub fn response(self) -> Response<Body> {
        let mut response = Response::new(Body::from(self.to_string()));
        *response.status_mut() = match self {
            UpgradeError::Version => {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                StatusCode::UPGRADE_REQUIRED
            }
            UpgradeError::NotUpgrade | UpgradeError::Malformed => StatusCode::BAD_REQUEST,
        };
        response
    }
}

impl Upgrade {
    /// Takes the upgrade out of an HTTP/1.1 request (RFC 6455 section 4.2.1).
    /// `NotUpgrade`: the request does not ask for a WebSocket at all (a plain GET).
    pub fn from_request<B>(request: &mut Request<B>) -> Result<Self, UpgradeError> {
        let headers = request.headers();
        if !has_token(headers, header::UPGRADE, "websocket") {
            return Err(UpgradeError::NotUpgrade);
        }
        if request.method() != Method::GET
            || request.version() > Version::HTTP_11
            || !has_token(headers, header::CONNECTION, "upgrade")
        {
            return Err(UpgradeError::Malformed);
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(UpgradeError::Version);
        }
        // The key is 16 random bytes in base64: 24 characters.
        let key = match headers.get(header::SEC_WEBSOCKET_KEY) {
            Some(key) if key.as_bytes().trim_ascii().len() == 24 => key.clone(),
            _ => return Err(UpgradeError::Malformed),
        };
        let on_upgrade = request
            .extensions_mut()
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::Malformed)?;
        Ok(Self { key, on_upgrade })
    }

    /// The `101 Switching Protocols` answer, and the connection once it is sent.
    pub fn accept(self) -> (Response<Body>, OnUpgrade) {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        // Base64 is always a valid header value.
        if let Ok(accept) = HeaderValue::from_str(&accept_key(self.key.as_bytes().trim_ascii())) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        (response, self.on_upgrade)
    }
}

/// `Sec-WebSocket-Accept` for a client's key.
pub fn accept_key(key: &[u8]) -> String {
    let mut hash = Sha1::new();
    hash.update(key);
    hash.update(ACCEPT_GUID);
    STANDARD.encode(hash.finalize())
}

/// Whether a comma-separated header has `token` (case-insensitive), as `Connection` and
/// `Upgrade` may list several.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// A frame to write: its opcode and payload (shared, so one delivery's bytes serve every
/// receiver without a copy).
#[derive(Debug, Clone)]
pub struct Frame {
    opcode: u8,
    /// Not the last frame of its message (a fragment: see [`Frame::fragment`]).
    more: bool,
    payload: Bytes,
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

impl Frame {
    /// A text message; `text` must be UTF-8 (the gateway writes only JSON it made).
    pub fn text(text: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&text).is_ok());
        Self {
            opcode: OP_TEXT,
            more: false,
            payload: text,
        }
    }

    /// One piece of a text message sent in pieces (RFC 6455 5.4): the first `first`, the last
    /// not `more`. Nothing but control frames may go between the pieces of one message.
    pub fn fragment(first: bool, more: bool, text: Bytes) -> Self {
        Self {
            opcode: if first { OP_TEXT } else { OP_CONTINUATION },
            more,
            payload: text,
        }
    }

    pub fn ping() -> Self {
        Self {
            opcode: OP_PING,
            more: false,
            payload: Bytes::new(),
        }
    }

    fn pong(payload: Bytes) -> Self {
        Self {
            opcode: OP_PONG,
            more: false,
            payload,
        }
    }

    /// A close with a code and a short reason (at most 123 bytes; longer is cut).
    pub fn close(code: u16, reason: &str) -> Self {
        let mut cut = reason.len().min(123);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut payload = Vec::with_capacity(2 + cut);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..cut]);
        Self {
            opcode: OP_CLOSE,
            more: false,
            payload: payload.into(),
        }
    }

    pub fn is_close(&self) -> bool {
        self.opcode == OP_CLOSE
    }

    /// The frame header (a server's frames are not masked) and its length.
    fn header(&self) -> ([u8; 10], usize) {
        let mut head = [0u8; 10];
        head[0] = if self.more { 0 } else { 0x80 } | self.opcode;
        let len = self.payload.len();
        if len < 126 {
            head[1] = len as u8;
            (head, 2)
        } else if let Ok(len) = u16::try_from(len) {
            head[1] = 126;
            head[2..4].copy_from_slice(&len.to_be_bytes());
            (head, 4)
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            (head, 10)
        }
    }

    /// Bytes on the wire: header and payload.
    fn wire_len(&self) -> usize {
        self.header().1 + self.payload.len()
    }
}

/// A message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary,
    /// A ping (answered already) or a pong: a sign of life.
    Ping,
    Pong,
    /// The client closed (the answering close is queued).
    Close,
}

/// Why reading from the client failed. Each but `Io` ends the connection with its close code.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("message over the size limit")]
    TooBig,
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    #[error("text message is not UTF-8")]
    InvalidText,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl ReadError {
    /// The close code to end the connection with, if the client is still there to get one.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ReadError::TooBig => Some(close::TOO_BIG),
            ReadError::Protocol(_) => Some(close::PROTOCOL_ERROR),
            ReadError::InvalidText => Some(close::INVALID_TEXT),
            ReadError::Io(_) => None,
        }
    }
}

/// A parsed frame header.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// Parses a client frame's header from the start of `buf`: `None` until all of it is there.
fn parse_head(buf: &[u8], max_message: usize) -> Result<Option<Head>, ReadError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(ReadError::Protocol("reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(ReadError::Protocol("reserved opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("client frame not masked"));
    }
    let (len, at) = match b1 & 0x7F {
        126 => {
            let Some(bytes) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
        }
        127 => {
            let Some(bytes) = buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(bytes);
            if len >> 63 != 0 {
                return Err(ReadError::Protocol("payload length with the top bit set"));
            }
            (len, 10)
        }
        short => (u64::from(short), 2),
    };
    let control = opcode >= OP_CLOSE;
    if control && (!fin || len > 125) {
        return Err(ReadError::Protocol("fragmented or oversized control frame"));
    }
    // Refused from the header alone: an oversized frame is never buffered.
    let payload_len = usize::try_from(len).map_err(|_| ReadError::TooBig)?;
    if !control && payload_len > max_message {
        return Err(ReadError::TooBig);
    }
    let Some(mask) = buf
        .get(at..at + 4)
        .and_then(|m| <[u8; 4]>::try_from(m).ok())
    else {
        return Ok(None);
    };
    Ok(Some(Head {
        fin,
        opcode,
        mask,
        header_len: at + 4,
        payload_len,
    }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Whether a close code may be sent by a peer (RFC 6455 section 7.4).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// A fragmented message being assembled.
struct Partial {
    text: bool,
    data: Vec<u8>,
}

/// One WebSocket connection. What is to be written is a queue the caller owns (so it can bound
/// it and see its length); [`Socket::poll_write`] writes from it.
pub struct Socket<T = TokioIo<Upgraded>> {
    io: T,
    /// Received bytes not yet taken as frames; no storage between messages.
    input: BytesMut,
    /// A fragmented message being assembled (rare: browsers send whole messages).
    partial: Option<Box<Partial>>,
    max_message: u32,
    /// Bytes of the front frame of the queue already written.
    written: usize,
    /// Our close frame was written: nothing may follow it.
    close_sent: bool,
    /// The client's close arrived (or its end of the stream): nothing more is read.
    close_received: bool,
    /// The answer to the client's last ping, if not queued yet (queued with the next write).
    pong: Option<Bytes>,
    /// The code of the client's close, to answer with ours when the connection is finished.
    peer_close: Option<u16>,
}

impl<T> std::fmt::Debug for Socket<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("buffered", &self.input.len())
            .field("close_sent", &self.close_sent)
            .field("close_received", &self.close_received)
            .finish_non_exhaustive()
    }
}

impl Socket {
    /// The connection an upgrade became.
    pub fn upgraded(io: Upgraded, max_message: usize) -> Self {
        Self::new(TokioIo::new(io), max_message)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Socket<T> {
    /// `max_message`: the largest message accepted, whole or in fragments.
    pub fn new(io: T, max_message: usize) -> Self {
        Self {
            io,
            input: BytesMut::new(),
            partial: None,
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            written: 0,
            close_sent: false,
            close_received: false,
            pong: None,
            peer_close: None,
        }
    }

    /// The next message from the client; `None` once the client has closed or gone.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Incoming, ReadError>>> {
        loop {
            if self.close_received {
                return Poll::Ready(None);
            }
            match self.take_message() {
                Ok(Some(message)) => {
                    if message == Incoming::Close {
                        self.close_received = true;
                    }
                    return Poll::Ready(Some(Ok(message)));
                }
                Ok(None) => {}
                Err(error) => {
                    // Nothing more is read after a broken frame.
                    self.close_received = true;
                    self.input = BytesMut::new();
                    self.partial = None;
                    return Poll::Ready(Some(Err(error)));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    self.close_received = true;
                    return Poll::Ready(None);
                }
                Ok(_) => {}
                Err(error) => {
                    self.close_received = true;
                    return Poll::Ready(Some(Err(error.into())));
                }
            }
        }
    }

    /// Reads more of the stream into `input`; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // A frame known to be large is read straight into its place; anything else through
        // the stack, so that a connection waiting for its next message holds no buffer.
        let missing = parse_head(&self.input, usize::MAX)
            .ok()
            .flatten()
            .map_or(0, |head| {
                (head.header_len + head.payload_len).saturating_sub(self.input.len())
            });
        if missing > READ_CHUNK {
            self.input.reserve(missing);
            return tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.input);
        }
        let mut chunk = [0u8; READ_CHUNK];
        let mut buf = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let read = buf.filled();
        self.input.extend_from_slice(read);
        Poll::Ready(Ok(read.len()))
    }

    /// Takes the next complete message out of `input`, handling control frames on the way.
    fn take_message(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let already = self.partial.as_ref().map_or(0, |p| p.data.len());
            let limit = (self.max_message as usize).saturating_sub(already);
            let Some(head) = parse_head(&self.input, limit)? else {
                return Ok(None);
            };
            let total = head.header_len + head.payload_len;
            if self.input.len() < total {
                return Ok(None);
            }
            let mut frame = self.input.split_to(total);
            if self.input.is_empty() {
                // Give the storage back: most connections wait most of the time.
                self.input = BytesMut::new();
            }
            frame.advance(head.header_len);
            unmask(&mut frame, head.mask);
            match head.opcode {
                OP_PING => {
                    self.pong = Some(frame.freeze());
                    return Ok(Some(Incoming::Ping));
                }
                OP_PONG => return Ok(Some(Incoming::Pong)),
                OP_CLOSE => {
                    let code = match frame.len() {
                        0 => 1000,
                        1 => return Err(ReadError::Protocol("close payload of one byte")),
                        _ => {
                            let code = u16::from_be_bytes([frame[0], frame[1]]);
                            if !valid_close_code(code) {
                                return Err(ReadError::Protocol("invalid close code"));
                            }
                            if std::str::from_utf8(&frame[2..]).is_err() {
                                return Err(ReadError::InvalidText);
                            }
                            code
                        }
                    };
                    // Answered when the connection is finished (`poll_close`), after what is
                    // queued, unless our own close went first.
                    self.pong = None;
                    self.peer_close = Some(code);
                    return Ok(Some(Incoming::Close));
                }
                OP_TEXT | OP_BINARY => {
                    if self.partial.is_some() {
                        return Err(ReadError::Protocol("new message inside a fragmented one"));
                    }
                    let text = head.opcode == OP_TEXT;
                    if head.fin {
                        return finish_message(text, frame.to_vec()).map(Some);
                    }
                    self.partial = Some(Box::new(Partial {
                        text,
                        data: frame.to_vec(),
                    }));
                }
                _ => {
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(ReadError::Protocol("continuation without a message"));
                    };
                    partial.data.extend_from_slice(&frame);
                    if head.fin {
                        if let Some(partial) = self.partial.take() {
                            return finish_message(partial.text, partial.data).map(Some);
                        }
                    }
                }
            }
        }
    }

    /// Writes the queue's frames as far as the socket takes them (a pending pong first, at a
    /// frame boundary); `Ready(Ok)` once the queue is empty and flushed. Nothing is written
    /// after a close frame.
    pub fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        queue: &mut VecDeque<Frame>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.close_sent {
                queue.clear();
                self.pong = None;
            }
            if self.written == 0 {
                if let Some(payload) = self.pong.take() {
                    queue.push_front(Frame::pong(payload));
                }
            }
            if queue.is_empty() {
                return Pin::new(&mut self.io).poll_flush(cx);
            }
            let written = {
                // Up to the first close: nothing goes after it.
                let count = queue
                    .iter()
                    .take(WRITE_BATCH)
                    .position(Frame::is_close)
                    .map_or(queue.len().min(WRITE_BATCH), |close| close + 1);
                let mut heads = [([0u8; 10], 0usize); WRITE_BATCH];
                for (head, frame) in heads.iter_mut().zip(queue.iter().take(count)) {
                    *head = frame.header();
                }
                let mut slices = [IoSlice::new(&[]); 2 * WRITE_BATCH];
                let mut used = 0;
                let mut skip = self.written;
                for ((head, len), frame) in heads.iter().zip(queue.iter().take(count)) {
                    for part in [&head[..*len], &frame.payload[..]] {
                        if skip >= part.len() {
                            skip -= part.len();
                            continue;
                        }
                        slices[used] = IoSlice::new(&part[skip..]);
                        skip = 0;
                        used += 1;
                    }
                }
                ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..used]))?
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let mut done = self.written + written;
            while let Some(front) = queue.front() {
                let len = front.wire_len();
                if done < len {
                    break;
                }
                done -= len;
                if front.is_close() {
                    self.close_sent = true;
                }
                queue.pop_front();
            }
            self.written = done;
        }
    }

    /// Drops the queued frames not yet begun (a frame partly written must be finished, or the
    /// stream would be corrupt).
    pub fn discard_unsent(&self, queue: &mut VecDeque<Frame>) {
        queue.truncate(usize::from(self.written > 0));
    }

    /// Ends the connection once the queue is written: answers the client's close if it sent
    /// one (ours, if queued, went already), ends our side of the stream, and reads until the
    /// client ends its side, so that nothing it still sends makes our end reset the connection
    /// before it has read our close. The caller bounds how long this may take.
    pub fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        queue: &mut VecDeque<Frame>,
    ) -> Poll<io::Result<()>> {
        if let Some(code) = self.peer_close.take() {
            if !self.close_sent {
                queue.push_back(Frame::close(code, ""));
            }
        }
        ready!(self.poll_write(cx, queue))?;
        ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
        self.input = BytesMut::new();
        self.partial = None;
        loop {
            let mut chunk = [0u8; READ_CHUNK];
            let mut buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// A complete data message: text must be UTF-8; binary ones are not kept (the protocol has
/// none).
fn finish_message(text: bool, data: Vec<u8>) -> Result<Incoming, ReadError> {
    if !text {
        return Ok(Incoming::Binary);
    }
    String::from_utf8(data)
        .map(Incoming::Text)
        .map_err(|_| ReadError::InvalidText)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0xFE); // masked, 16-bit length
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0xFF); // masked, 64-bit length
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        let mut body = payload.to_vec();
        unmask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn headers_use_the_shortest_length_form() {
        for (len, head_len, b1) in [(0, 2, 0), (125, 2, 125), (126, 4, 126), (65_535, 4, 126)] {
            let frame = Frame::text(Bytes::from(vec![b'a'; len]));
            let (head, n) = frame.header();
            assert_eq!((n, head[0], head[1]), (head_len, 0x81, b1), "len {len}");
        }
        let frame = Frame::text(Bytes::from(vec![b'a'; 65_536]));
        let (head, n) = frame.header();
        assert_eq!((n, head[1]), (10, 127));
        assert_eq!(u64::from_be_bytes(head[2..10].try_into().unwrap()), 65_536);
    }

    /// A message in pieces: text without FIN first, continuations, FIN only on the last.
    #[test]
    fn fragments_carry_fin_only_on_the_last() {
        let first = Frame::fragment(true, true, Bytes::from_static(b"{"));
        let middle = Frame::fragment(false, true, Bytes::from_static(b"1"));
        let last = Frame::fragment(false, false, Bytes::from_static(b"}"));
        assert_eq!(first.header().0[0], OP_TEXT);
        assert_eq!(middle.header().0[0], OP_CONTINUATION);
        assert_eq!(last.header().0[0], 0x80 | OP_CONTINUATION);
    }

    #[test]
    fn heads_are_parsed_only_when_complete() {
        let frame = masked(true, OP_TEXT, &[b'x'; 300]);
        for cut in 0..8 {
            assert_eq!(parse_head(&frame[..cut], 1000).unwrap(), None, "cut {cut}");
        }
        let head = parse_head(&frame, 1000).unwrap().unwrap();
        assert_eq!(
            (head.fin, head.opcode, head.header_len, head.payload_len),
            (true, 1, 8, 300)
        );
    }

    #[test]
    fn framing_violations_are_refused() {
        let mut unmasked = masked(true, OP_TEXT, b"hi");
        unmasked[1] &= 0x7F;
        let mut reserved = masked(true, OP_TEXT, b"hi");
        reserved[0] |= 0x40;
        let bad_opcode = masked(true, 0x3, b"hi");
        let long_ping = masked(true, OP_PING, &[0; 126]);
        let split_ping = masked(false, OP_PING, b"");
        for (name, frame) in [
            ("unmasked", unmasked),
            ("reserved bit", reserved),
            ("opcode", bad_opcode),
            ("long control", long_ping),
            ("fragmented control", split_ping),
        ] {
            assert!(
                matches!(parse_head(&frame, 1000), Err(ReadError::Protocol(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        let frame = masked(true, OP_TEXT, &[b'x'; 2000]);
        assert!(matches!(
            parse_head(&frame[..8], 1999),
            Err(ReadError::TooBig)
        ));
        assert!(parse_head(&frame[..8], 2000).unwrap().is_some());
    }

    #[test]
    fn close_codes() {
        for code in [1000, 1001, 1003, 1007, 1011, 3000, 4999] {
            assert!(valid_close_code(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 2999, 5000] {
            assert!(!valid_close_code(code), "{code}");
        }
    }

    /// A socket on one end of an in-memory stream of `capacity` bytes, the client on the other.
    fn pair(
        capacity: usize,
        max_message: usize,
    ) -> (Socket<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (server, client) = tokio::io::duplex(capacity);
        (Socket::new(server, max_message), client)
    }

    async fn next(
        socket: &mut Socket<tokio::io::DuplexStream>,
    ) -> Option<Result<Incoming, ReadError>> {
        std::future::poll_fn(|cx| socket.poll_next(cx)).await
    }

    async fn write(socket: &mut Socket<tokio::io::DuplexStream>, queue: &mut VecDeque<Frame>) {
        std::future::poll_fn(|cx| socket.poll_write(cx, queue))
            .await
            .unwrap();
    }

    /// Reads one unmasked server frame: opcode and payload.
    async fn server_frame(client: &mut tokio::io::DuplexStream) -> (u8, Vec<u8>) {
        use tokio::io::AsyncReadExt as _;
        let mut head = [0u8; 2];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0] & 0xF0, 0x80, "final, no reserved bits");
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] & 0x7F {
            126 => u64::from(client.read_u16().await.unwrap()),
            127 => client.read_u64().await.unwrap(),
            n => u64::from(n),
        };
        let mut payload = vec![0; usize::try_from(len).unwrap()];
        client.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x0F, payload)
    }

    #[tokio::test]
    async fn messages_whole_fragmented_and_split_across_reads() {
        use tokio::io::AsyncWriteExt as _;
        let (mut socket, mut client) = pair(1 << 20, 100_000);
        let big = "y".repeat(70_000);
        let mut bytes = masked(true, OP_TEXT, b"hello");
        bytes.extend(masked(false, OP_TEXT, b"frag"));
        bytes.extend(masked(true, OP_PING, b"p"));
        bytes.extend(masked(false, OP_CONTINUATION, b"men"));
        bytes.extend(masked(true, OP_CONTINUATION, b"ted"));
        bytes.extend(masked(true, OP_TEXT, big.as_bytes()));
        bytes.extend(masked(true, OP_BINARY, b"\x00\x01"));
        // Written a few bytes at a time: every frame boundary falls inside a read somewhere.
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(7) {
                client.write_all(piece).await.unwrap();
            }
            client
        });
        assert_eq!(
            next(&mut socket).await.unwrap().unwrap(),
            Incoming::Text("hello".into())
        );
        assert_eq!(next(&mut socket).await.unwrap().unwrap(), Incoming::Ping);
        assert_eq!(
            next(&mut socket).await.unwrap().unwrap(),
            Incoming::Text("fragmented".into())
        );
        assert_eq!(
            next(&mut socket).await.unwrap().unwrap(),
            Incoming::Text(big)
        );
        assert_eq!(next(&mut socket).await.unwrap().unwrap(), Incoming::Binary);
        let mut client = writer.await.unwrap();
        // Nothing is kept between messages.
        assert_eq!(socket.input.capacity(), 0);
        // The ping is answered with the next write.
        let mut queue = VecDeque::new();
        write(&mut socket, &mut queue).await;
        assert_eq!(server_frame(&mut client).await, (OP_PONG, b"p".to_vec()));
    }

    #[tokio::test]
    async fn bad_input_is_refused_with_its_close_code() {
        use tokio::io::AsyncWriteExt as _;
        let cases: [(&str, Vec<u8>, u16); 4] = [
            (
                "invalid UTF-8",
                masked(true, OP_TEXT, &[0xff, 0xfe]),
                close::INVALID_TEXT,
            ),
            (
                "continuation first",
                masked(true, OP_CONTINUATION, b"x"),
                close::PROTOCOL_ERROR,
            ),
            (
                "fragments over the limit",
                [
                    masked(false, OP_TEXT, &[b'a'; 60]),
                    masked(true, OP_CONTINUATION, &[b'a'; 60]),
                ]
                .concat(),
                close::TOO_BIG,
            ),
            (
                "close code 1005",
                masked(true, OP_CLOSE, &1005u16.to_be_bytes()),
                close::PROTOCOL_ERROR,
            ),
        ];
        for (name, bytes, code) in cases {
            let (mut socket, mut client) = pair(4096, 100);
            client.write_all(&bytes).await.unwrap();
            let error = next(&mut socket).await.unwrap().unwrap_err();
            assert_eq!(error.close_code(), Some(code), "{name}: {error}");
            assert!(
                next(&mut socket).await.is_none(),
                "{name}: nothing read after"
            );
        }
    }

    #[tokio::test]
    async fn frames_survive_partial_writes_in_order() {
        // A 64-byte pipe: every vectored write is cut somewhere inside a header or payload.
        let (mut socket, mut client) = pair(64, 1000);
        let sizes = [0usize, 1, 125, 126, 300, 65_536, 70_000, 3];
        let mut queue: VecDeque<Frame> = sizes
            .iter()
            .map(|&n| Frame::text(Bytes::from(vec![b'0' + (n % 10) as u8; n])))
            .collect();
        queue.push_back(Frame::close(4001, "session expired"));
        queue.push_back(Frame::text(Bytes::from_static(b"after the close")));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..=sizes.len() {
                got.push(server_frame(&mut client).await);
            }
            (got, client)
        });
        write(&mut socket, &mut queue).await;
        let (got, mut client) = reader.await.unwrap();
        for (&n, (opcode, payload)) in sizes.iter().zip(&got) {
            assert_eq!(*opcode, OP_TEXT);
            assert_eq!(payload.len(), n);
            assert!(payload.iter().all(|&b| b == b'0' + (n % 10) as u8));
        }
        let (opcode, payload) = got.last().unwrap();
        assert_eq!(*opcode, OP_CLOSE);
        assert_eq!(&payload[..2], &4001u16.to_be_bytes());
        assert_eq!(&payload[2..], b"session expired");
        // Nothing after the close.
        assert!(queue.is_empty());
        drop(socket);
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest)
            .await
            .unwrap();
        assert!(rest.is_empty(), "{} bytes after the close", rest.len());
    }

    #[tokio::test]
    async fn a_client_close_is_answered_with_its_code() {
        use tokio::io::AsyncWriteExt as _;
        let (mut socket, mut client) = pair(4096, 1000);
        let mut payload = 4000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        client
            .write_all(&masked(true, OP_CLOSE, &payload))
            .await
            .unwrap();
        assert_eq!(next(&mut socket).await.unwrap().unwrap(), Incoming::Close);
        assert!(next(&mut socket).await.is_none());
        let mut queue = VecDeque::new();
        let closing = tokio::spawn(async move {
            std::future::poll_fn(|cx| socket.poll_close(cx, &mut queue)).await
        });
        assert_eq!(
            server_frame(&mut client).await,
            (OP_CLOSE, 4000u16.to_be_bytes().to_vec())
        );
        // Our side ended; the socket waits for the client's end, then is done.
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest)
            .await
            .unwrap();
        drop(client);
        closing.await.unwrap().unwrap();
    }

    #[test]
    fn close_reasons_are_cut_on_a_character_boundary() {
        let frame = Frame::close(1000, &"é".repeat(100));
        assert!(frame.payload.len() <= 125);
        assert!(std::str::from_utf8(&frame.payload[2..]).is_ok());
        assert_eq!(&frame.payload[..2], &1000u16.to_be_bytes());
    }
}
