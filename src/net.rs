//! A byte stream to a client or a server: plain TCP, or TLS. The relay
//! works on readiness plus non-blocking `try_read`/`try_write`, which a TLS
//! session cannot offer directly; so a TLS connection is terminated by its
//! own small task that pumps bytes between the TLS session and one end of
//! a Unix socket pair, and the relay gets the other end. Plain TCP, the
//! common and measured case, pays nothing for this.

use bytes::BytesMut;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// How long a closing TLS connection may take to deliver its last bytes.
const TUNNEL_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

pub enum Stream {
    Tcp(TcpStream),
    /// A client on the Unix-domain socket (`listen.unix_socket_dir`); `local`
    /// is the TCP listener's address (same port).
    Unix { inner: UnixStream, local: SocketAddr },
    /// The relay's end of a TLS tunnel; `local` is the TCP socket's address.
    /// Dropping it drops `_closed`, which tells the pump to finish.
    Tunnel { inner: UnixStream, local: SocketAddr, _closed: tokio::sync::oneshot::Sender<()> },
}

impl Stream {
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => inner.readable().await,
        }
    }

    pub async fn writable(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.writable().await,
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => inner.writable().await,
        }
    }

    /// Readiness for reading, with one waker slot per direction inside the
    /// socket's registration: nothing is allocated or linked per wait (the
    /// relay is the only task polling a socket while it owns it).
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => inner.poll_read_ready(cx),
        }
    }

    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_write_ready(cx),
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => inner.poll_write_ready(cx),
        }
    }

    /// Reads what is there into `buf` (after reserving `chunk` bytes of
    /// space), for the relay's hot path: a read that leaves part of
    /// the buffer unfilled shows the socket's receive queue is empty (epoll
    /// is edge-triggered), so read readiness is cleared. Without this, the
    /// next wait returns at once and a read gets EAGAIN: one wasted wakeup
    /// and syscall per message exchange. tokio's own `poll_read` does the
    /// same; tokio's `try_read_buf` clears readiness only on EAGAIN.
    pub fn read_some(&self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
        buf.reserve(chunk);
        match self {
            Stream::Tcp(s) => read_clearing(buf, |f| s.try_io(Interest::READABLE, f), |b| s.try_read_buf(b)),
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => {
                read_clearing(buf, |f| inner.try_io(Interest::READABLE, f), |b| inner.try_read_buf(b))
            }
        }
    }

    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_read(buf),
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => inner.try_read(buf),
        }
    }

    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write(buf),
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => inner.try_write(buf),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Stream::Tcp(s) => s.local_addr(),
            Stream::Tunnel { local, .. } | Stream::Unix { local, .. } => Ok(*local),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tunnel { .. })
    }

    /// A Unix-domain socket client: local by construction, so TLS is
    /// neither offered nor required (as with PgBouncer).
    pub fn is_unix(&self) -> bool {
        matches!(self, Stream::Unix { .. })
    }

    /// Runs `tls` (a finished TLS handshake over a socket whose local
    /// address is `local`) in a pump task; returns the relay's end.
    ///
    /// The pump ends with the connection, never later: once the relay has
    /// let go of its end, or the client has closed its side, what is still
    /// on its way to the client gets `TUNNEL_LINGER` to be written (then
    /// close_notify), and the socket is closed. A client that keeps a
    /// connection pgfleet closed open without reading or writing would
    /// otherwise hold a task, a TLS session and a file descriptor forever,
    /// outside `max_client_conn`.
    pub fn tunnel<S>(tls: S, local: SocketAddr) -> io::Result<Stream>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use tokio::io::AsyncWriteExt;
        let (ours, theirs) = UnixStream::pair()?;
        let (closed, relay_gone) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut tls_r, mut tls_w) = tokio::io::split(tls);
            let (mut our_r, mut our_w) = ours.into_split();
            let to_relay = async {
                let _ = tokio::io::copy(&mut tls_r, &mut our_w).await;
                let _ = our_w.shutdown().await;
            };
            let to_client = async {
                let _ = tokio::io::copy(&mut our_r, &mut tls_w).await;
                let _ = tls_w.shutdown().await;
            };
            tokio::pin!(to_relay, to_client);
            tokio::select! {
                _ = &mut to_client => return,
                _ = &mut to_relay => {}
                _ = relay_gone => {}
            }
            let _ = tokio::time::timeout(TUNNEL_LINGER, to_client).await;
        });
        Ok(Stream::Tunnel { inner: theirs, local, _closed: closed })
    }
}

/// `read` (tokio's `try_read_buf`) inside `try_io`: a short read is
/// reported to `try_io` as WouldBlock, so it clears the readiness it saw
/// before the read (a newer readiness event survives), and the bytes read
/// are still returned. tokio never clears closed-connection readiness, so
/// an EOF after data is still seen.
fn read_clearing(
    buf: &mut BytesMut,
    try_io: impl FnOnce(&mut dyn FnMut() -> io::Result<()>) -> io::Result<()>,
    read: impl Fn(&mut BytesMut) -> io::Result<usize>,
) -> io::Result<usize> {
    let want = buf.capacity() - buf.len();
    let mut got = None;
    let result = try_io(&mut || {
        let n = read(buf)?;
        got = Some(n);
        if n > 0 && n < want {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match got {
        Some(n) => Ok(n),
        None => result.map(|_| 0),
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => Pin::new(inner).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => Pin::new(inner).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => Pin::new(inner).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tunnel { inner, .. } | Stream::Unix { inner, .. } => Pin::new(inner).poll_shutdown(cx),
        }
    }
}

/// Binds the Unix-domain client socket at `path` with permissions `mode`.
/// A file already there is replaced: a stale one left by a crash, or the
/// socket of a pgfleet being replaced by this one (as with the TCP
/// listener's SO_REUSEPORT, the newest process takes new clients; the old
/// one leaves the file alone when it stops).
pub fn bind_unix(path: &std::path::Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(named(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "exists and is not a socket")));
        }
        std::fs::remove_file(path).map_err(named)?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(named)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(named)?;
    Ok(l)
}

/// Binds the client listener with SO_REUSEPORT, so a new pgfleet can bind
/// the same address while the old one drains (zero-downtime restarts).
pub fn bind_reuseport(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr: SocketAddr = addr
        .parse()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(addr)?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{addr}: resolves to no address")))
        })?;
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    // A deep accept queue: a connection storm waits in it instead of being dropped.
    socket.listen(4096)
}
