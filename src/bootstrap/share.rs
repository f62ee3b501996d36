//! The master hands `starlingd` to the other nodes, so the user's machine uploads it once.
//!
//! `starlingd share` (on the master, started by its bootstrap) serves one file over plain TCP on
//! the cluster's network to whoever first sends the token it printed; it exits once nobody with
//! the token has asked for [`IDLE`] and every transfer has ended (`down` stops it sooner). A node fetches the file with [`fetch_command`] — Python's standard
//! library, which every node has for its kernels — and keeps it only if its SHA-256 is the one
//! the user's machine computed, so a corrupted or substituted file is refused, never run. The
//! bytes are public (the binary anyone can build); the token only keeps the server from being a
//! file server for strangers.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

/// How long the server waits for the next request with the token before it exits: nodes
/// beyond the first 32 of a large cluster start only when earlier ones are done, setup
/// commands included, which can take minutes.
pub const IDLE: Duration = Duration::from_secs(600);
/// How long a connection may take to send its token.
const TOKEN_WITHIN: Duration = Duration::from_secs(10);
/// The exit status of [`fetch_command`] when what arrived is not the file asked for.
pub const EXIT_CORRUPT: u8 = 98;
/// The exit status of [`fetch_command`] when the file could not be fetched whole (the master out
/// of reach — a firewall between listed hosts, say — or the transfer cut short): the caller
/// uploads it instead.
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
    aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| "no randomness for a token".to_string())?;
    let token: Arc<str> = hex::encode(raw).into();
    ready(&token);
    // Each transfer says when it began (a right token), so only those keep the server up.
    let (asked_tx, mut asked) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut transfers = tokio::task::JoinSet::new();
    let mut deadline = tokio::time::Instant::now() + idle;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(()) = asked.recv() => {
                deadline = tokio::time::Instant::now() + idle;
                continue;
            }
            () = tokio::time::sleep_until(deadline) => break,
        };
        let (mut sock, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (bytes, token, asked_tx) = (bytes.clone(), token.clone(), asked_tx.clone());
        transfers.spawn(async move {
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
            let _ = asked_tx.send(());
            match write.write_all(&bytes).await {
                Ok(()) => tracing::info!(%peer, bytes = bytes.len(), "sent"),
                Err(e) => tracing::warn!(%peer, "sending failed: {e}"),
            }
        });
        while transfers.try_join_next().is_some() {}
    }
    tracing::info!(
        "nobody asked for {} for {idle:?}; done once the transfers in progress end",
        file.display()
    );
    drop(listener);
    while transfers.join_next().await.is_some() {}
    Ok(())
}

/// The shell command that fetches the `len` bytes shared at `addr` with `token` into `dest`
/// using `python`, and leaves them there only if their SHA-256 is `sha`: a file of the right
/// length with another checksum exits [`EXIT_CORRUPT`] with a message naming both checksums;
/// a master out of reach or a transfer cut short exits [`EXIT_UNREACHABLE`]. `dest` is a shell
/// word already (it may hold `"$HOME"`); the other arguments are quoted here.
pub fn fetch_command(
    python: &str,
    addr: &str,
    token: &str,
    dest: &str,
    len: usize,
    sha: &str,
) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
    // An IPv6 address comes as `[addr]:port`.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let q = crate::engine::shell_quote;
    format!(
        "{} -c {} {} {} {} {dest} {len} {}",
        q(python),
        q(FETCH_PY),
        q(host),
        q(port),
        q(token),
        q(sha)
    )
}

/// What [`fetch_command`] runs: connect, send the token, read to the end, check the checksum.
const FETCH_PY: &str = r#"import hashlib, os, socket, sys
host, port, token, dest, want, sha = sys.argv[1:7]
def give_up(why, status):
    try:
        os.remove(dest)
    except OSError:
        pass
    sys.stderr.write(why + "\n")
    sys.exit(status)
h, n = hashlib.sha256(), 0
try:
    s = socket.create_connection((host, int(port)), timeout=10)
    s.settimeout(60)
    s.sendall(token.encode() + b"\n")
    with open(dest, "wb") as f:
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            h.update(b)
            f.write(b)
            n += len(b)
except OSError as e:
    give_up("cannot fetch starlingd from the master at %s:%s: %s" % (host, port, e), 95)
if n != int(want):
    give_up("the master at %s:%s sent %d of the %s bytes of starlingd" % (host, port, n, want), 95)
if h.hexdigest() != sha:
    give_up("the starlingd fetched from the master (%d bytes) has SHA-256 %s, not %s: refused" % (n, h.hexdigest(), sha), 98)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fetch_command_quotes_its_arguments() {
        let c = fetch_command("python3", "127.0.0.4:4711", "abc", "\"$HOME/x\"", 12, "ff");
        assert!(c.starts_with("'python3' -c 'import hashlib"), "{c}");
        assert!(
            c.ends_with(" '127.0.0.4' '4711' 'abc' \"$HOME/x\" 12 'ff'"),
            "{c}"
        );
        let v6 = fetch_command("python3", "[::1]:4711", "abc", "x", 12, "ff");
        assert!(v6.contains(" '::1' '4711' "), "{v6}");
        assert!(FETCH_PY.contains(&format!(", {EXIT_CORRUPT})")));
        assert!(FETCH_PY.contains(&format!(", {EXIT_UNREACHABLE})")));
    }
}
