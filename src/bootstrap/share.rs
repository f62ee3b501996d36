//! The master hands `starlingd` to the other nodes, so the user's machine uploads it once.
//!
//! `starlingd share` (on the master, started by its bootstrap) serves one file over plain TCP on
//! the cluster's network to whoever first sends the token it printed; it exits once nobody has
//! asked for [`IDLE`]. A node fetches the file with [`fetch_command`] — Python's standard
//! library, which every node has for its kernels — and keeps it only if its SHA-256 is the one
//! the user's machine computed, so a corrupted or substituted file is refused, never run. The
//! bytes are public (the binary anyone can build); the token only keeps the server from being a
//! file server for strangers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

/// How long the server waits for the next request before it exits: time enough for every node
/// of a large cluster to log in and ask, short enough that nothing lingers after `up`.
pub const IDLE: Duration = Duration::from_secs(120);
/// How long a connection may take to send its token.
const TOKEN_WITHIN: Duration = Duration::from_secs(10);
/// The exit status of [`fetch_command`] when what arrived is not the file asked for.
pub const EXIT_CORRUPT: u8 = 98;
/// The exit status of [`fetch_command`] when the master cannot be reached (a firewall between
/// listed hosts, say): the caller uploads the file instead.
pub const EXIT_UNREACHABLE: u8 = 95;

/// Serves `file` on `listener` until nobody has asked for it for `idle`. `ready` hears the
/// token to give the nodes, once the file is read.
pub async fn serve(
    listener: TcpListener,
    file: &Path,
    idle: Duration,
    ready: impl FnOnce(&str),
) -> Result<(), String> {
    let bytes: Arc<[u8]> = std::fs::read(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?
        .into();
    let mut raw = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| "no randomness for a token".to_string())?;
    let token: Arc<str> = hex::encode(raw).into();
    ready(&token);
    loop {
        let Ok(accepted) = tokio::time::timeout(idle, listener.accept()).await else {
            tracing::info!("nobody asked for {} for {idle:?}; done", file.display());
            return Ok(());
        };
        let (mut sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (bytes, token) = (bytes.clone(), token.clone());
        tokio::spawn(async move {
            let (read, mut write) = sock.split();
            let mut line = String::new();
            let asked = tokio::time::timeout(
                TOKEN_WITHIN,
                BufReader::new(read.take(64)).read_line(&mut line),
            )
            .await;
            if !matches!(asked, Ok(Ok(_))) || line.trim() != &*token {
                tracing::warn!(%peer, "refused: no token, or the wrong one");
                return;
            }
            match write.write_all(&bytes).await {
                Ok(()) => tracing::info!(%peer, bytes = bytes.len(), "sent"),
                Err(e) => tracing::warn!(%peer, "sending failed: {e}"),
            }
        });
    }
}

/// The shell command that fetches the file shared at `addr` with `token` into `dest` using
/// `python`, and keeps it only if its SHA-256 is `sha` (exit status [`EXIT_CORRUPT`] with a
/// message saying both checksums otherwise). All arguments are shell-quoted here.
pub fn fetch_command(python: &str, addr: &str, token: &str, dest: &str, sha: &str) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
    let q = crate::engine::shell_quote;
    format!(
        "{} -c {} {} {} {} {dest} {}",
        q(python),
        q(FETCH_PY),
        q(host),
        q(port),
        q(token),
        q(sha)
    )
}

/// What [`fetch_command`] runs: connect, send the token, read to the end, check the checksum.
const FETCH_PY: &str = r#"import hashlib, socket, sys
host, port, token, dest, sha = sys.argv[1:6]
try:
    s = socket.create_connection((host, int(port)), timeout=10)
except OSError as e:
    sys.stderr.write("cannot reach the master at %s:%s to fetch starlingd: %s\n" % (host, port, e))
    sys.exit(95)
try:
    s.settimeout(60)
    s.sendall(token.encode() + b"\n")
    h, n = hashlib.sha256(), 0
    with open(dest, "wb") as f:
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            h.update(b)
            f.write(b)
            n += len(b)
except OSError as e:
    sys.exit("cannot fetch starlingd from the master at %s:%s: %s" % (host, port, e))
if h.hexdigest() != sha:
    sys.stderr.write("the starlingd fetched from the master (%d bytes) has SHA-256 %s, not %s: refused\n" % (n, h.hexdigest(), sha))
    sys.exit(98)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fetch_command_quotes_its_arguments() {
        let c = fetch_command("python3", "127.0.0.4:4711", "abc", "\"$HOME/x\"", "ff");
        assert!(c.starts_with("'python3' -c 'import hashlib"), "{c}");
        assert!(
            c.ends_with(" '127.0.0.4' '4711' 'abc' \"$HOME/x\" 'ff'"),
            "{c}"
        );
        assert!(FETCH_PY.contains(&format!("sys.exit({EXIT_CORRUPT})")));
        assert!(FETCH_PY.contains(&format!("sys.exit({EXIT_UNREACHABLE})")));
    }
}
