//! A TCP proxy for fault injection: forwards every connection to a target port until it is told
//! to black-hole the connections it holds. A black-holed connection stays open at both ends and
//! forwards nothing more, in either direction: no reset, no close, as when a load balancer, a NAT
//! or a failover forgets a connection. Connections accepted afterwards pass. The target can be
//! moved (a standby promoted behind the same address). Or the address can go away: every
//! connection closed, and each later one closed as soon as it is accepted (a load balancer with
//! no node behind it), counted as a knock. Or it can go silent: every connection black-holed,
//! and each new one accepted and never answered (a hung node).

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

struct Shared {
    target: AtomicU16,
    /// Connections are numbered as they are accepted; those numbered below this are black-holed.
    holed_below: AtomicU64,
    accepted: AtomicU64,
    /// Fired when the address goes away.
    gone: CancellationToken,
    /// When each connection accepted since then (and closed at once) was made.
    knocks: Mutex<Vec<Instant>>,
    /// Set when the address goes silent.
    silent: AtomicBool,
}

/// A running proxy on a loopback port. Dropping it closes every connection it holds.
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Starts forwarding `127.0.0.1:<new port>` to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            target: AtomicU16::new(target),
            holed_below: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            gone: CancellationToken::new(),
            knocks: Mutex::default(),
            silent: AtomicBool::new(false),
        });
        let mut tasks = JoinSet::new();
        let accepting = shared.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                if accepting.gone.is_cancelled() {
                    accepting.knocks.lock().unwrap().push(Instant::now());
                    drop(client);
                    continue;
                }
                if accepting.silent.load(Ordering::SeqCst) {
                    // Held open, never answered, until the proxy is dropped.
                    connections.spawn(async move {
                        let _held = client;
                        std::future::pending::<()>().await;
                    });
                    continue;
                }
                let number = accepting.accepted.fetch_add(1, Ordering::SeqCst);
                let shared = accepting.clone();
                connections.spawn(forward(client, number, shared));
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            port,
            shared,
            tasks,
        }
    }

    /// Black-holes every connection open now; new connections pass.
    pub fn black_hole(&self) {
        let accepted = self.shared.accepted.load(Ordering::SeqCst);
        self.shared.holed_below.store(accepted, Ordering::SeqCst);
    }

    /// The address goes away: every connection is closed now, and each new one as soon as it is
    /// accepted.
    #[allow(dead_code)]
    pub fn go_away(&self) {
        self.shared.gone.cancel();
    }

    /// The address goes silent: every connection open now is black-holed, and each new one is
    /// accepted and never answered.
    #[allow(dead_code)]
    pub fn go_silent(&self) {
        self.shared.silent.store(true, Ordering::SeqCst);
        self.black_hole();
    }

    /// When each connection to the address since it went away was made.
    #[allow(dead_code)]
    pub fn knocks(&self) -> Vec<Instant> {
        self.shared.knocks.lock().unwrap().clone()
    }

    /// Sends new connections to another port from now on.
    #[allow(dead_code)]
    pub fn move_to(&self, target: u16) {
        self.shared.target.store(target, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn forward(client: TcpStream, number: u64, shared: Arc<Shared>) {
    let target = shared.target.load(Ordering::SeqCst);
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let gone = shared.gone.clone();
    let holed = move || shared.holed_below.load(Ordering::SeqCst) > number;
    let holed_too = holed.clone();
    // Each direction ends when its side closes, or stops (holding both sockets open) once the
    // connection is black-holed.
    let up = pump(client_read, server_write, holed);
    let down = pump(server_read, client_write, holed_too);
    // Both sockets are dropped, so closed, when the address goes away.
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        () = gone.cancelled() => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    holed: impl Fn() -> bool,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if holed() {
            // Swallow everything from now on and never close: the peer hears nothing.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    if holed() {
        std::future::pending::<()>().await;
    }
    let _ = to.shutdown().await;
}
