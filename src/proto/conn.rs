//! Frames and typed connections.
//!
//! A frame is a 4-byte big-endian length and that many bytes of MessagePack
//! ([`LengthDelimitedCodec`] with a hard maximum). A [`Conn<S, Rx, Tx>`] only receives `Rx` and
//! only sends `Tx`. [`connect`] and [`accept`] do TLS and the handshake of [`super::auth`] and
//! hand back a connection typed for the peer's role.

use std::marker::PhantomData;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedParts, FramedWrite, LengthDelimitedCodec};

use super::auth::{self, Auth, Hello, Key, Role, ServerHandshake, Verdict};
use super::{
    ClientToController, ControllerToClient, ControllerToEngine, EngineToController, ProtoError,
};

/// How long each side waits for the other's handshake frame. Generous, because a controller on
/// a freshly booted node can be slow, yet short enough that a silent peer is dropped quickly.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The frame limit until the handshake is done: its frames are tiny, and a peer that has not
/// proved it holds a key must not make the controller buffer megabytes.
pub const HANDSHAKE_MAX_FRAME: usize = 16 * 1024;

/// Bytes a client leaves free below the frame limit in every request, for the envelope the
/// controller wraps around the work when it passes it on to an engine.
pub const ENVELOPE_MARGIN: usize = 4096;

/// How long to wait for the TCP connection to the controller to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

/// One encoded message, ready to write: its bytes in order, in parts. A large byte string of
/// a field marked [`shared_bytes`] or [`shared_buffers`] (a pushed array, a pulled result) is a
/// part of its own, the very buffer it is held in: passing a 100 MB value on copies none of it.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    first: bytes::Bytes,
    more: Vec<bytes::Bytes>,
    len: usize,
}

impl Frame {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its parts, in order.
    pub fn parts(&self) -> impl Iterator<Item = &bytes::Bytes> {
        std::iter::once(&self.first).chain(&self.more)
    }

    /// The frame as one buffer: its only part, or its parts copied together.
    pub fn into_bytes(self) -> bytes::Bytes {
        if self.more.is_empty() {
            return self.first;
        }
        let mut all = Vec::with_capacity(self.len);
        for part in self.parts() {
            all.extend_from_slice(part);
        }
        all.into()
    }

    fn push(&mut self, part: bytes::Bytes) {
        if part.is_empty() {
            return;
        }
        self.len += part.len();
        if self.first.is_empty() {
            self.first = part;
        } else {
            self.more.push(part);
        }
    }
}

impl From<bytes::Bytes> for Frame {
    fn from(b: bytes::Bytes) -> Self {
        let mut frame = Frame::default();
        frame.push(b);
        frame
    }
}

thread_local! {
    /// The large byte string [`shared_bytes::serialize`] is serializing on this thread, for
    /// [`Gather`] to take as a part instead of copying it.
    static GATHERING: std::cell::RefCell<Option<bytes::Bytes>> = const { std::cell::RefCell::new(None) };
}

/// What [`encode`] writes into: bytes are copied, except the large byte string being
/// serialized ([`GATHERING`]), which becomes a part of the frame.
#[derive(Default)]
struct Gather {
    copied: Vec<u8>,
    frame: Frame,
}

impl std::io::Write for Gather {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() >= SHARE_FROM {
            let same = |b: &mut bytes::Bytes| b.as_ptr() == buf.as_ptr() && b.len() == buf.len();
            if let Some(b) = GATHERING.with(|g| g.borrow_mut().take_if(same)) {
                self.frame.push(std::mem::take(&mut self.copied).into());
                self.frame.push(b);
                return Ok(buf.len());
            }
        }
        self.copied.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encodes a message as one frame's payload.
pub fn encode<T: Serialize>(msg: &T) -> Frame {
    let mut out = Gather::default();
    msg.serialize(&mut rmp_serde::Serializer::new(&mut out))
        .expect("protocol messages always serialize");
    out.frame.push(out.copied.into());
    out.frame
}

/// Decodes one frame's payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtoError> {
    rmp_serde::from_slice(bytes).map_err(|e| ProtoError::Malformed(e.to_string()))
}

thread_local! {
    /// The frame [`decode_frame`] is decoding on this thread.
    static DECODING: std::cell::RefCell<Option<bytes::Bytes>> = const { std::cell::RefCell::new(None) };
}

/// Byte strings from this size on, and at least a quarter of their frame ([`SHARE_PART`]),
/// share the buffer of the frame they are decoded from (see [`shared_bytes`]). Others are
/// copied out, so that a value kept for long (a result the controller holds) keeps at most
/// about four times its size alive (a frame has its allocation to itself: [`take_frame`]),
/// never a large frame it merely came with.
const SHARE_FROM: usize = 64 * 1024;
/// See [`SHARE_FROM`]: the results of a pull from four engines, in one frame, still share it.
const SHARE_PART: usize = 4;

/// Decodes a received frame: like [`decode`], but the large byte strings of fields marked
/// [`shared_bytes`] or [`shared_buffers`] are slices of `frame`, not copies of it.
pub fn decode_frame<T: DeserializeOwned>(frame: &bytes::Bytes) -> Result<T, ProtoError> {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            DECODING.with(|d| d.borrow_mut().take());
        }
    }
    if frame.len() < SHARE_FROM {
        // Nothing in it is large enough to share.
        return decode(frame);
    }
    DECODING.with(|d| *d.borrow_mut() = Some(frame.clone()));
    let _clear = Clear;
    decode(frame)
}

/// A frame just read from `framed`, ready for [`decode_frame`]. A large frame keeps the read
/// buffer's allocation to itself: what follows it is moved to a new buffer, so a value sliced
/// from a later frame never keeps the large frame's allocation alive, and a value sliced from
/// this one keeps alive about as much as the frame.
fn take_frame<T>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
    frame: bytes::BytesMut,
) -> bytes::Bytes {
    if frame.len() >= SHARE_FROM {
        let rest = framed.read_buffer_mut();
        // At least the codec's usual start, so that small frames after it are read many at a
        // time again.
        let mut fresh = bytes::BytesMut::with_capacity(rest.len().max(8 << 10));
        fresh.extend_from_slice(rest);
        *rest = fresh;
    }
    frame.freeze()
}

/// A byte string of [`shared_bytes`]: decoded by [`SharedVisitor`], encoded as a part of its
/// frame.
struct SharedBytes(bytes::Bytes);

impl serde::Serialize for SharedBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        shared_bytes::serialize(&self.0, s)
    }
}

impl<'de> serde::Deserialize<'de> for SharedBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(SharedVisitor).map(SharedBytes)
    }
}

struct SharedVisitor;

impl<'de> serde::de::Visitor<'de> for SharedVisitor {
    type Value = bytes::Bytes;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E>(self, b: &'de [u8]) -> Result<Self::Value, E> {
        if b.len() >= SHARE_FROM {
            let shared = DECODING.with(|d| {
                let frame = d.borrow();
                let frame = frame.as_ref().filter(|f| b.len() * SHARE_PART >= f.len())?;
                let (start, at) = (frame.as_ptr() as usize, b.as_ptr() as usize);
                (at >= start && at + b.len() <= start + frame.len()).then(|| frame.slice_ref(b))
            });
            if let Some(shared) = shared {
                return Ok(shared);
            }
        }
        Ok(bytes::Bytes::copy_from_slice(b))
    }

    fn visit_bytes<E>(self, b: &[u8]) -> Result<Self::Value, E> {
        Ok(bytes::Bytes::copy_from_slice(b))
    }

    fn visit_byte_buf<E>(self, b: Vec<u8>) -> Result<Self::Value, E> {
        Ok(b.into())
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(v.into())
    }
}

/// `#[serde(with = "shared_bytes")]` for a `Bytes` field that may be large: decoded by
/// [`decode_frame`], it shares the frame's buffer; encoded by [`encode`], it is a part of the
/// frame, not a copy.
pub mod shared_bytes {
    use super::{SharedBytes, GATHERING, SHARE_FROM};

    pub fn serialize<S: serde::Serializer>(b: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        if b.len() < SHARE_FROM {
            return s.serialize_bytes(b);
        }
        GATHERING.with(|g| *g.borrow_mut() = Some(b.clone()));
        let done = s.serialize_bytes(b);
        // Still there when `s` was not [`encode`]'s (it copied).
        GATHERING.with(|g| g.borrow_mut().take());
        done
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        <SharedBytes as serde::Deserialize>::deserialize(d).map(|b| b.0)
    }
}

/// [`shared_bytes`] for a `Vec<Bytes>` field.
pub mod shared_buffers {
    use super::SharedBytes;
    use serde::ser::SerializeSeq;

    pub fn serialize<S: serde::Serializer>(v: &[bytes::Bytes], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for b in v {
            seq.serialize_element(&SharedBytes(b.clone()))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<bytes::Bytes>, D::Error> {
        <Vec<SharedBytes> as serde::Deserialize>::deserialize(d)
            .map(|v| v.into_iter().map(|b| b.0).collect())
    }
}

fn read_error(e: std::io::Error) -> ProtoError {
    use std::io::ErrorKind;
    if e.kind() == ErrorKind::InvalidData {
        ProtoError::Malformed(e.to_string())
    } else if matches!(
        e.kind(),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
    ) {
        ProtoError::Dropped
    } else {
        ProtoError::Io(e)
    }
}

/// A connection that receives `Rx` and sends `Tx`.
pub struct Conn<S, Rx, Tx> {
    framed: Framed<S, LengthDelimitedCodec>,
    _types: PhantomData<fn(Tx) -> Rx>,
}

impl<S: AsyncRead + AsyncWrite + Unpin, Rx: DeserializeOwned, Tx: Serialize> Conn<S, Rx, Tx> {
    pub fn new(stream: S, max_frame: usize) -> Self {
        Self {
            framed: Framed::new(stream, codec(max_frame)),
            _types: PhantomData,
        }
    }

    pub async fn send(&mut self, msg: &Tx) -> Result<(), ProtoError> {
        self.framed.send(encode(msg).into_bytes()).await?;
        Ok(())
    }

    /// The next message, or `None` when the peer closed the connection cleanly.
    pub async fn recv(&mut self) -> Result<Option<Rx>, ProtoError> {
        match self.framed.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(read_error(e)),
            Some(Ok(bytes)) => decode_frame(&take_frame(&mut self.framed, bytes)).map(Some),
        }
    }

    async fn recv_within(&mut self, limit: Duration) -> Result<Rx, ProtoError> {
        match tokio::time::timeout(limit, self.recv()).await {
            Err(_) => Err(ProtoError::HandshakeTimeout(limit.as_secs())),
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(ProtoError::Closed),
            Ok(Err(e)) => Err(e),
        }
    }

    #[cfg(test)]
    async fn feed_for_test(&mut self, msg: &Tx) {
        self.framed.feed(encode(msg).into_bytes()).await.unwrap();
    }

    #[cfg(test)]
    async fn flush_for_test(&mut self) {
        SinkExt::<bytes::Bytes>::flush(&mut self.framed)
            .await
            .unwrap();
    }

    /// Changes the frame limit (after the handshake).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.framed.codec_mut().set_max_frame_length(max_frame);
    }

    /// The same stream, typed for the next phase of the conversation.
    pub fn retype<Rx2, Tx2>(self) -> Conn<S, Rx2, Tx2> {
        Conn {
            framed: self.framed,
            _types: PhantomData,
        }
    }

    /// Splits into a reader and a writer that can live in different tasks.
    pub fn split(self) -> (Reader<S, Rx>, Writer<S, Tx>) {
        let parts = self.framed.into_parts();
        let max = parts.codec.max_frame_length();
        let (r, w) = tokio::io::split(parts.io);
        // Frames that arrived with the last one read are already in the buffer: the reader
        // must decode them before it waits on the socket, or it waits for the peer's next
        // frame with work in hand (`from_parts` marks a non-empty buffer readable; a
        // `FramedRead` whose buffer is filled by hand does not).
        let mut read = FramedParts::new::<bytes::Bytes>(r, codec(max));
        read.read_buf = parts.read_buf;
        let read = Framed::from_parts(read);
        (
            Reader {
                inner: read,
                _t: PhantomData,
            },
            Writer {
                inner: FramedWrite::new(w, codec(max)),
                _t: PhantomData,
            },
        )
    }
}

/// The receiving half of a [`Conn`].
pub struct Reader<S, Rx> {
    inner: Framed<tokio::io::ReadHalf<S>, LengthDelimitedCodec>,
    _t: PhantomData<fn() -> Rx>,
}

impl<S: AsyncRead + AsyncWrite, Rx: DeserializeOwned> Reader<S, Rx> {
    /// The next message, or `None` when the peer closed the connection cleanly.
    pub async fn recv(&mut self) -> Result<Option<Rx>, ProtoError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(read_error(e)),
            Some(Ok(bytes)) => decode_frame(&take_frame(&mut self.inner, bytes)).map(Some),
        }
    }
}

/// The sending half of a [`Conn`]. `feed` queues, `flush` writes: a writer loop feeds every
/// message that is ready and flushes once, so a burst becomes few TLS records and syscalls.
pub struct Writer<S, Tx> {
    inner: FramedWrite<tokio::io::WriteHalf<S>, LengthDelimitedCodec>,
    _t: PhantomData<fn(Tx)>,
}

/// Frames from this size on are written part by part (after what was fed before them), their
/// large parts from their own buffers instead of copied into the writer's: a 100 MB push is
/// not copied once more.
pub const WRITE_DIRECT: usize = 64 * 1024;

impl<S: AsyncRead + AsyncWrite, Tx: Serialize> Writer<S, Tx> {
    pub async fn feed(&mut self, msg: &Tx) -> Result<(), ProtoError> {
        self.feed_frame(encode(msg)).await
    }

    /// Ends the connection: what was fed is flushed, then the stream is shut down.
    pub async fn close(&mut self) {
        let _ = SinkExt::<bytes::Bytes>::close(&mut self.inner).await;
    }

    /// Queues one encoded frame; a large one is written at once (see [`WRITE_DIRECT`]).
    pub async fn feed_frame(&mut self, frame: Frame) -> Result<(), ProtoError> {
        if frame.len() < WRITE_DIRECT {
            self.inner.feed(frame.into_bytes()).await?;
            return Ok(());
        }
        // The limit the codec would have enforced.
        let len = u32::try_from(frame.len())
            .ok()
            .filter(|&n| n as usize <= self.inner.encoder().max_frame_length())
            .ok_or_else(|| {
                ProtoError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "frame size too big",
                ))
            })?;
        // The length goes out with what was fed before, small parts with it, large ones from
        // their own buffers.
        self.inner
            .write_buffer_mut()
            .extend_from_slice(&len.to_be_bytes());
        for part in frame.parts() {
            if part.len() < WRITE_DIRECT {
                self.inner.write_buffer_mut().extend_from_slice(part);
            } else {
                SinkExt::<bytes::Bytes>::flush(&mut self.inner).await?;
                self.inner.get_mut().write_all(part).await?;
            }
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ProtoError> {
        SinkExt::<bytes::Bytes>::flush(&mut self.inner).await?;
        Ok(())
    }

    /// Feeds every message from `rx` as it comes, flushing whenever the queue runs dry; returns
    /// when `rx` closes or the socket fails.
    pub async fn pump(
        mut self,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Tx>,
    ) -> Result<(), ProtoError> {
        while let Some(msg) = rx.recv().await {
            self.feed(&msg).await?;
            while let Ok(more) = rx.try_recv() {
                self.feed(&more).await?;
            }
            self.flush().await?;
        }
        let _ = SinkExt::<bytes::Bytes>::close(&mut self.inner).await;
        Ok(())
    }

    /// Like [`Self::pump`], for frames already encoded (see [`encode`]) — by a sender that
    /// checked their size against the limit first, and counted them in `backlog`; ends with
    /// [`ProtoError::Cut`] when the backlog is cut.
    pub async fn pump_frames(
        mut self,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Frame>,
        backlog: &Backlog,
    ) -> Result<(), ProtoError> {
        let pump = async {
            // A frame leaves the backlog when the writer takes it: the one being written is
            // not waiting any more (a large one is written from its own buffer, and may take
            // as long as the peer takes to read it).
            while let Some(frame) = rx.recv().await {
                backlog.sent(frame.len());
                self.feed_frame(frame).await?;
                while let Ok(more) = rx.try_recv() {
                    backlog.sent(more.len());
                    self.feed_frame(more).await?;
                }
                SinkExt::<bytes::Bytes>::flush(&mut self.inner).await?;
            }
            let _ = SinkExt::<bytes::Bytes>::close(&mut self.inner).await;
            Ok(())
        };
        tokio::select! {
            r = pump => r,
            () = backlog.cut.cancelled() => Err(ProtoError::Cut(
                "the peer did not read what was sent to it".into(),
            )),
        }
    }
}

/// What waits in one connection's queue of encoded frames, in bytes, and a switch that ends
/// the connection: the sender of a peer that does not read (its backlog past a bound) cuts it
/// instead of buffering for ever.
#[derive(Debug, Default)]
pub struct Backlog {
    queued: std::sync::atomic::AtomicUsize,
    cut: tokio_util::sync::CancellationToken,
}

impl Backlog {
    /// Bytes queued and not yet taken by the connection's writer.
    pub fn queued(&self) -> usize {
        self.queued.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts `n` more bytes queued.
    pub fn queue(&self, n: usize) {
        self.queued
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn sent(&self, n: usize) {
        // Saturating: frames a sender did not count (control messages) are not subtracted
        // below zero.
        let _ = self.queued.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |q| Some(q.saturating_sub(n)),
        );
    }

    /// Ends the connection: its writer stops, and so does whoever waits on [`Self::cut_off`].
    pub fn cut(&self) {
        self.cut.cancel();
    }

    /// Completes once the connection is cut.
    pub async fn cut_off(&self) {
        self.cut.cancelled().await;
    }
}

/// What TLS runs over: the socket, read through a buffer of [`READ_AHEAD`] bytes. rustls
/// asks for at most 4 KiB at a time, so a 100 MB frame read straight from the socket took
/// some 25,000 system calls; through the buffer it takes about 1,600 (and a copy of each byte
/// in memory, which costs far less).
pub type Socket = tokio::io::BufReader<TcpStream>;
/// See [`Socket`]: per connection, so a controller with a thousand engines holds 64 MiB of it.
const READ_AHEAD: usize = 64 * 1024;
/// The TLS stream on the controller's side.
pub type ServerStream = tokio_rustls::server::TlsStream<Socket>;
/// The TLS stream on a client's or engine's side.
pub type PeerStream = tokio_rustls::client::TlsStream<Socket>;

/// The controller's view of a client connection.
pub type ClientConn = Conn<ServerStream, ClientToController, ControllerToClient>;
/// The controller's view of an engine connection.
pub type EngineConn = Conn<ServerStream, EngineToController, ControllerToEngine>;

/// A connection that passed the handshake, typed by the peer's role.
pub enum Accepted {
    Client(ClientConn),
    Engine(EngineConn),
}

/// The keys the controller checks peers against.
#[derive(Debug, Clone)]
pub struct ServerKeys {
    pub client: Key,
    pub engine: Key,
}

/// Controller side: TLS, then the handshake. A refusal is sent to the peer before the error is
/// returned, so both sides can say why.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    keys: &ServerKeys,
    max_frame: usize,
) -> Result<Accepted, ProtoError> {
    tcp.set_nodelay(true)?;
    let tcp = Socket::with_capacity(READ_AHEAD, tcp);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| ProtoError::HandshakeTimeout(HANDSHAKE_TIMEOUT.as_secs()))?
        .map_err(|e| ProtoError::Tls(e.to_string()))?;
    let hs = ServerHandshake::new();
    let mut conn: Conn<ServerStream, Auth, Hello> = Conn::new(tls, HANDSHAKE_MAX_FRAME);
    conn.send(&hs.hello()).await?;
    let auth = conn.recv_within(HANDSHAKE_TIMEOUT).await?;
    let mut conn: Conn<ServerStream, (), Verdict> = conn.retype();
    match hs.verify(&auth, &keys.client, &keys.engine) {
        Ok(role) => {
            conn.send(&Verdict::Welcome).await?;
            conn.set_max_frame(max_frame);
            Ok(match role {
                Role::Client => Accepted::Client(conn.retype()),
                Role::Engine => Accepted::Engine(conn.retype()),
            })
        }
        Err(refusal) => {
            let _ = conn.send(&Verdict::Refused(refusal.clone())).await;
            Err(ProtoError::Refused(refusal))
        }
    }
}

/// Client or engine side: connect, TLS with the pinned certificate, answer the handshake.
pub async fn connect<Rx: DeserializeOwned, Tx: Serialize>(
    addr: &str,
    pinned_cert_pem: &str,
    role: Role,
    key: &Key,
    max_frame: usize,
) -> Result<Conn<PeerStream, Rx, Tx>, ProtoError> {
    let connector = super::tls::connector(pinned_cert_pem)?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            ProtoError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer from {addr} within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
            ))
        })??;
    tcp.set_nodelay(true)?;
    let tcp = Socket::with_capacity(READ_AHEAD, tcp);
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        connector.connect(super::tls::server_name(), tcp),
    )
    .await
    .map_err(|_| ProtoError::HandshakeTimeout(HANDSHAKE_TIMEOUT.as_secs()))?
    .map_err(|e| ProtoError::Tls(e.to_string()))?;
    let mut conn: Conn<PeerStream, Hello, Auth> = Conn::new(tls, HANDSHAKE_MAX_FRAME);
    let hello = conn.recv_within(HANDSHAKE_TIMEOUT).await?;
    conn.send(&auth::answer(&hello, role, key)).await?;
    let mut conn: Conn<PeerStream, Verdict, ()> = conn.retype();
    match conn.recv_within(HANDSHAKE_TIMEOUT).await? {
        Verdict::Welcome => {
            conn.set_max_frame(max_frame);
            Ok(conn.retype())
        }
        Verdict::Refused(r) => Err(ProtoError::Refused(r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn large_byte_strings_share_the_frame_and_small_ones_are_copied() {
        use crate::proto::Value;
        let big = bytes::Bytes::from(vec![7u8; SHARE_FROM + 1]);
        let value = Value::Pickle(Box::new(crate::proto::Pickled {
            repr: "array".into(),
            bytes: vec![1u8; 40].into(),
            buffers: vec![big.clone()],
            json: None,
        }));
        // Encoded, the large buffer is a part of the frame: the same memory, not a copy.
        let encoded = encode(&vec![value.clone()]);
        let parts: Vec<&bytes::Bytes> = encoded.parts().collect();
        assert_eq!(parts.len(), 3, "before it, it, after it");
        assert_eq!(parts[1].as_ptr(), big.as_ptr());
        assert_eq!(encoded.len(), parts.iter().map(|p| p.len()).sum::<usize>());
        let frame = encoded.into_bytes();
        assert_eq!(
            frame,
            bytes::Bytes::from(rmp_serde::to_vec(&vec![value.clone()]).unwrap()),
            "the same bytes as a plain encoding"
        );
        let decoded: Vec<Value> = decode_frame(&frame).unwrap();
        assert_eq!(
            decoded,
            std::slice::from_ref(&value),
            "the same value comes out"
        );
        let within = |b: &bytes::Bytes| {
            let (start, at) = (frame.as_ptr() as usize, b.as_ptr() as usize);
            at >= start && at + b.len() <= start + frame.len()
        };
        let Value::Pickle(p) = &decoded[0] else {
            unreachable!()
        };
        let (bytes, buffers) = (&p.bytes, &p.buffers);
        assert!(
            within(&buffers[0]),
            "the large buffer is a slice of the frame"
        );
        assert!(!within(bytes), "the small pickle is a copy");
        // Decoded without a frame to share, it is a copy, and still the same value.
        let copied: Vec<Value> = decode(&frame).unwrap();
        let Value::Pickle(p) = &copied[0] else {
            unreachable!()
        };
        let buffers = &p.buffers;
        assert!(!within(&buffers[0]) && buffers[0] == big);
        // A large string that is a small part of its frame is copied: kept, it does not keep
        // the rest of the frame alive.
        let other = Value::Pickle(Box::new(crate::proto::Pickled {
            repr: "other".into(),
            bytes: vec![2u8; 40].into(),
            buffers: vec![vec![3u8; SHARE_PART * SHARE_FROM].into()],
            json: None,
        }));
        let frame = encode(&vec![value.clone(), other]).into_bytes();
        let decoded: Vec<Value> = decode_frame(&frame).unwrap();
        let within = |b: &bytes::Bytes| {
            let (start, at) = (frame.as_ptr() as usize, b.as_ptr() as usize);
            at >= start && at + b.len() <= start + frame.len()
        };
        let (Value::Pickle(small), Value::Pickle(large)) = (&decoded[0], &decoded[1]) else {
            unreachable!()
        };
        let (small, large) = (&small.buffers, &large.buffers);
        assert!(
            !within(&small[0]) && small[0] == big,
            "a fifth of its frame: copied"
        );
        assert!(within(&large[0]), "most of its frame: shared");
    }

    #[tokio::test]
    async fn messages_round_trip_through_frames() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut tx: Conn<_, (), super::super::ClientToController> = Conn::new(a, 1024);
        let mut rx: Conn<_, super::super::ClientToController, ()> = Conn::new(b, 1024);
        let msg = super::super::ClientToController {
            id: 7,
            body: super::super::ClientRequest::Ids,
        };
        tx.send(&msg).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), Some(msg));
        drop(tx);
        assert_eq!(rx.recv().await.unwrap(), None);
    }

    #[tokio::test]
    async fn garbage_and_oversized_frames_are_errors_not_panics() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut rx: Conn<_, super::super::ClientToController, ()> = Conn::new(b, 1024);
        a.write_all(&[0, 0, 0, 3, 0xc1, 0xff, 0x00]).await.unwrap();
        assert!(matches!(rx.recv().await, Err(ProtoError::Malformed(_))));

        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut rx: Conn<_, super::super::ClientToController, ()> = Conn::new(b, 1024);
        a.write_all(&[0x7f, 0xff, 0xff, 0xff]).await.unwrap();
        let err = rx.recv().await.unwrap_err();
        assert!(matches!(err, ProtoError::Malformed(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_frame_that_arrived_with_the_previous_one_is_read_after_a_split() {
        // The controller's `Registered` and first `Run` often reach an engine in one read: the
        // reader made by `split` must hand out the second without waiting for more bytes.
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut tx: Conn<_, (), super::super::ClientToController> = Conn::new(a, 1024);
        let mut rx: Conn<_, super::super::ClientToController, ()> = Conn::new(b, 1024);
        let msg = |id| super::super::ClientToController {
            id,
            body: super::super::ClientRequest::Ids,
        };
        tx.feed_for_test(&msg(1)).await;
        tx.feed_for_test(&msg(2)).await;
        tx.flush_for_test().await;
        assert_eq!(rx.recv().await.unwrap(), Some(msg(1)));
        let (mut reader, _writer) = rx.split();
        let second = tokio::time::timeout(Duration::from_secs(5), reader.recv())
            .await
            .expect("the buffered frame is read without new bytes on the wire");
        assert_eq!(second.unwrap(), Some(msg(2)));
        drop(tx);
    }

    #[tokio::test]
    async fn large_frames_written_from_their_own_buffer_arrive_whole_and_in_order() {
        use super::super::{ClientRequest, ClientToController, JobSpec, Targets, Value, Work};
        let push = |id, n: usize| ClientToController {
            id,
            body: ClientRequest::Submit {
                spec: JobSpec::Direct {
                    targets: Targets::All,
                    work: Work::Push {
                        values: vec![(
                            "a".into(),
                            Value::Pickle(Box::new(crate::proto::Pickled {
                                repr: format!("{n} bytes"),
                                bytes: vec![1u8; 40].into(),
                                buffers: vec![vec![(id % 251) as u8; n].into()],
                                json: None,
                            })),
                        )],
                    },
                },
                options: Box::default(),
                wait: false,
            },
        };
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_, writer) = Conn::<_, (), ClientToController>::new(a, 4 << 20).split();
        let (mut reader, _) = Conn::<_, ClientToController, ()>::new(b, 4 << 20).split();
        // Small and large frames queued together: the large ones skip the writer's buffer.
        let sizes = [10, 3 << 20, 100, WRITE_DIRECT, 70_000, 5];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (id, n) in sizes.iter().enumerate() {
            tx.send(encode(&push(id as u64, *n))).unwrap();
        }
        drop(tx);
        let pump =
            tokio::spawn(async move { writer.pump_frames(&mut rx, &Backlog::default()).await });
        for (id, n) in sizes.iter().enumerate() {
            let got = reader.recv().await.unwrap();
            assert_eq!(got, Some(push(id as u64, *n)), "frame {id} ({n} bytes)");
        }
        assert_eq!(reader.recv().await.unwrap(), None, "then the writer closed");
        pump.await.unwrap().unwrap();

        // A frame above the limit is refused, not sent.
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_, writer) = Conn::<_, (), ClientToController>::new(a, 1 << 20).split();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(encode(&push(0, 2 << 20))).unwrap();
        let err = writer
            .pump_frames(&mut rx, &Backlog::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("frame size too big"), "{err}");
        drop(b);
    }
}
