//! A tiny TCP load balancer for tests: one free loopback port in front of several backends,
//! as a site puts one name in front of several Reach instances (the SMTP listeners that the MX
//! or the site MTA points at, the webhook URL that Kannel's `get-url` names).
//!
//! Each new connection goes to the next backend in turn (round-robin); a backend that refuses
//! the connection (a killed instance) is skipped and the next one tried (fail-over), so a
//! client only sees a refusal when every backend refuses. Bytes are copied both ways until
//! either side closes; a backend killed mid-connection closes the client's connection too, as a
//! real balancer would.
//!
//! For fault injection a balancer can also, for every new connection, refuse it (accept and
//! close at once: the peer sees the connection end) or swallow it (accept and never answer: a
//! peer that hangs), and [`Balancer::cut`] ends every connection in progress. With one backend
//! it is a plain forwarder that a test can cut: between a Reach instance and the XMPP server,
//! or between an instance and its mail relay.
//!
//! Everything runs as tasks of the test's tokio runtime; dropping the balancer stops them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What a balancer does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// To the next backend that takes it (round-robin with fail-over).
    Forward,
    /// Accepted and closed at once.
    Refuse,
    /// Accepted and held open without a byte either way, until [`Balancer::cut`] or the drop.
    Swallow,
}

struct Shared {
    backends: Vec<SocketAddr>,
    /// Backends taken out of the rotation by the test (as if marked down).
    down: Vec<bool>,
    mode: Mode,
    /// The backend the next connection tries first.
    next: usize,
    /// Connections handed to each backend so far.
    served: Vec<usize>,
    /// Connections of the current mode that were refused or swallowed.
    refused: usize,
    swallowed: usize,
    /// Connections in progress (copying or swallowed), to end them on `cut`.
    live: Vec<JoinHandle<()>>,
}

/// A round-robin, fail-over TCP forwarder on 127.0.0.1 (see the module comment).
pub struct Balancer {
    port: u16,
    shared: Arc<Mutex<Shared>>,
    accepted: Arc<AtomicUsize>,
    acceptor: JoinHandle<()>,
}

/// How long connecting to one backend may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Balancer {
    /// Starts a balancer on a free loopback port in front of `backends` (in this order).
    pub async fn start(backends: Vec<SocketAddr>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a balancer port");
        let port = listener.local_addr().expect("balancer address").port();
        let n = backends.len();
        let shared = Arc::new(Mutex::new(Shared {
            backends,
            down: vec![false; n],
            mode: Mode::Forward,
            next: 0,
            served: vec![0; n],
            refused: 0,
            swallowed: 0,
            live: Vec::new(),
        }));
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio::spawn(accept_loop(listener, shared.clone(), accepted.clone()));
        Balancer {
            port,
            shared,
            accepted,
            acceptor,
        }
    }

    /// A balancer in front of `127.0.0.1:PORT` for each port.
    pub async fn on_ports(ports: &[u16]) -> Balancer {
        Balancer::start(
            ports
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
        )
        .await
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// "127.0.0.1:PORT" of the balancer.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What to do with new connections from now on (connections in progress go on).
    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    /// Takes backend `index` out of the rotation (`true`) or puts it back (`false`).
    pub fn set_down(&self, index: usize, down: bool) {
        self.lock().down[index] = down;
    }

    /// Ends every connection in progress (both sides see it close).
    pub fn cut(&self) {
        for task in std::mem::take(&mut self.lock().live) {
            task.abort();
        }
    }

    /// Connections handed to each backend so far, by index.
    pub fn served(&self) -> Vec<usize> {
        self.lock().served.clone()
    }

    /// Connections accepted in every mode so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections swallowed so far (accepted and held without an answer).
    pub fn swallowed(&self) -> usize {
        self.lock().swallowed
    }

    /// Connections refused so far (accepted and closed at once, or no backend took them).
    pub fn refused(&self) -> usize {
        self.lock().refused
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.cut();
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Mutex<Shared>>,
    accepted: Arc<AtomicUsize>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        let task_shared = shared.clone();
        let task = tokio::spawn(async move { serve(client, task_shared).await });
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        s.live.retain(|t| !t.is_finished());
        s.live.push(task);
    }
}

/// One client connection, in the mode of the moment it arrived.
async fn serve(mut client: TcpStream, shared: Arc<Mutex<Shared>>) {
    let (mode, order) = {
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        let n = s.backends.len();
        let start = s.next;
        s.next = (s.next + 1) % n.max(1);
        let order: Vec<(usize, SocketAddr)> = (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| !s.down[i])
            .map(|i| (i, s.backends[i]))
            .collect();
        match s.mode {
            Mode::Refuse => s.refused += 1,
            Mode::Swallow => s.swallowed += 1,
            Mode::Forward => {}
        }
        (s.mode, order)
    };
    match mode {
        Mode::Refuse => return,
        Mode::Swallow => {
            // Held open, never answered, until cut (the task is aborted) or the peer leaves.
            let mut sink = [0u8; 1024];
            use tokio::io::AsyncReadExt;
            while let Ok(n) = client.read(&mut sink).await {
                if n == 0 {
                    return;
                }
            }
            return;
        }
        Mode::Forward => {}
    }
    for (index, addr) in order {
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await;
        if let Ok(Ok(mut backend)) = connected {
            let _ = backend.set_nodelay(true);
            shared.lock().unwrap_or_else(|e| e.into_inner()).served[index] += 1;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
            return;
        }
    }
    shared.lock().unwrap_or_else(|e| e.into_inner()).refused += 1;
}
