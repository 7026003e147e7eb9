//! Load generator for the network benchmarks: the same client for every server.
//!
//!     loadgen tcp  --addr 127.0.0.1:PORT --conns 10 --size 1024 --warmup 0.5 --duration 2
//!     loadgen unix --path /tmp/x.sock   ...
//!     loadgen tls  --addr 127.0.0.1:PORT --ca ca.pem [--name localhost] ...
//!     loadgen udp  --addr 127.0.0.1:PORT ...
//!     loadgen idle --addr 127.0.0.1:PORT --count 5000 [--concurrency 50]
//!     loadgen churn --addr 127.0.0.1:PORT --conns 10 --size 64 --warmup 0.5 --duration 2
//!
//! Echo modes: `--conns` connections (sockets for udp), each a ping-pong loop:
//! send one `--size`-byte message, read the whole echo back, repeat. Echoes are
//! checked byte for byte (the first and every 64th round trip). After the
//! warm-up the generator prints `WARM {...}` and waits for a line on stdin (the
//! runner reads the server's CPU time then), runs the measured phase, prints
//! `RESULT {"requests": N, "elapsed": s, ...}`, and exits at stdin EOF (so the
//! runner can read the server's CPU time again before connections close).
//! `--no-wait` runs straight through.
//!
//! Idle mode: opens `--count` TCP connections (at most `--concurrency` connects
//! in flight), each sends one byte and reads its echo, then holds them all and
//! prints `HELD {...}`; at stdin EOF it resets them (SO_LINGER 0: no TIME_WAIT).
//!
//! Churn mode: `--conns` workers, each a loop of whole connections: connect, send one
//! `--size`-byte message, read the whole echo back (checked), close. The client closes
//! first, with a plain close (FIN, no RST): the server sees EOF, as with a real client that
//! is done. `requests` counts completed connections; the WARM / go / RESULT protocol is the
//! echo modes'. The closing side keeps each connection in TIME_WAIT for 60 s, so on a
//! loopback server every connection binds a source address of its own out of 127.0.0.2 to
//! 127.0.0.254 in turn (with IP_BIND_ADDRESS_NO_PORT, so the port is still picked at connect
//! time for the whole 4-tuple): 253 × ~28k ephemeral ports per minute, where one source
//! address gives ~28k (the ports of `ip_local_port_range`) and would run out within seconds
//! at tens of thousands of connections per second, whatever `tcp_tw_reuse` says. A connect
//! that still fails (EADDRNOTAVAIL) stops the run with that error, not a wrong count.
//!
//! One thread (tokio current_thread runtime), so it takes at most one core.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferroloop_netbench::{die, load_certs, provider, raise_nofile, stdin_line, Args};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket, UnixStream};

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}
type Conn = Box<dyn Stream>;

fn message(size: usize, seed: usize) -> Vec<u8> {
    (0..size)
        .map(|i| ((i * 31 + seed * 7) % 251) as u8)
        .collect()
}

async fn pingpong(
    mut c: Conn,
    msg: Vec<u8>,
    flush: bool,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(Conn, u64)> {
    let mut buf = vec![0u8; msg.len()];
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        c.write_all(&msg).await?;
        if flush {
            c.flush().await?;
        }
        c.read_exact(&mut buf).await?;
        if n.is_multiple_of(64) && buf != msg {
            return Err(std::io::Error::other("echo mismatch"));
        }
        n += 1;
    }
    Ok((c, n))
}

async fn udp_pingpong(
    s: UdpSocket,
    msg: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(UdpSocket, u64, u64)> {
    let mut buf = vec![0u8; msg.len() + 1];
    let (mut n, mut lost) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        s.send(&msg).await?;
        match tokio::time::timeout(Duration::from_millis(200), s.recv(&mut buf)).await {
            Err(_) => lost += 1, // timed out: resend
            Ok(r) => {
                let k = r?;
                if k != msg.len() || (n.is_multiple_of(64) && buf[..k] != msg[..]) {
                    return Err(std::io::Error::other("udp echo mismatch"));
                }
                n += 1;
            }
        }
    }
    Ok((s, n, lost))
}

struct Phase {
    requests: u64,
    lost: u64,
    elapsed: f64,
    cpu: f64, // this process's CPU seconds during the phase
}

async fn run_streams(conns: Vec<Conn>, size: usize, dur: f64, flush: bool) -> (Vec<Conn>, Phase) {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = self_cpu();
    let start = Instant::now();
    let hs: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(pingpong(c, message(size, i), flush, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(dur)).await;
    stop.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    let mut requests = 0;
    for h in hs {
        match h.await.unwrap() {
            Ok((c, n)) => {
                out.push(c);
                requests += n;
            }
            Err(e) => die(&format!("connection failed: {e}")),
        }
    }
    (
        out,
        Phase {
            requests,
            lost: 0,
            elapsed: start.elapsed().as_secs_f64(),
            cpu: self_cpu() - cpu0,
        },
    )
}

async fn run_udp(socks: Vec<UdpSocket>, size: usize, dur: f64) -> (Vec<UdpSocket>, Phase) {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = self_cpu();
    let start = Instant::now();
    let hs: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(udp_pingpong(s, message(size, i), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(dur)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut out, mut requests, mut lost) = (Vec::new(), 0, 0);
    for h in hs {
        match h.await.unwrap() {
            Ok((s, n, l)) => {
                out.push(s);
                requests += n;
                lost += l;
            }
            Err(e) => die(&format!("udp socket failed: {e}")),
        }
    }
    (
        out,
        Phase {
            requests,
            lost,
            elapsed: start.elapsed().as_secs_f64(),
            cpu: self_cpu() - cpu0,
        },
    )
}

/// This process's user+system CPU seconds so far.
fn self_cpu() -> f64 {
    // SAFETY: getrusage fills the zero-initialised struct we pass.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut r);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        tv(r.ru_utime) + tv(r.ru_stime)
    }
}

fn say(tag: &str, p: &Phase, size: usize) {
    println!(
        "{tag} {{\"requests\": {}, \"lost\": {}, \"elapsed\": {:.6}, \"bytes\": {}, \"client_cpu\": {:.6}}}",
        p.requests,
        p.lost,
        p.elapsed,
        p.requests * size as u64 * 2,
        p.cpu
    );
    std::io::stdout().flush().unwrap();
}

async fn connect_all(a: &Args, n: usize) -> Vec<Conn> {
    let mut v: Vec<Conn> = Vec::with_capacity(n);
    let tls = if a.mode == "tls" {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(a.req("ca")) {
            roots.add(c).unwrap_or_else(|e| die(&e.to_string()));
        }
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    } else {
        None
    };
    for _ in 0..n {
        match a.mode.as_str() {
            "unix" => v.push(Box::new(
                UnixStream::connect(a.req("path"))
                    .await
                    .unwrap_or_else(|e| die(&e.to_string())),
            )),
            _ => {
                let s = TcpStream::connect(a.req("addr"))
                    .await
                    .unwrap_or_else(|e| die(&e.to_string()));
                s.set_nodelay(true).unwrap();
                if let Some(tc) = &tls {
                    let name = rustls::pki_types::ServerName::try_from(
                        a.get("name").unwrap_or("localhost").to_string(),
                    )
                    .unwrap_or_else(|e| die(&e.to_string()));
                    let t = tc
                        .connect(name, s)
                        .await
                        .unwrap_or_else(|e| die(&format!("TLS handshake: {e}")));
                    v.push(Box::new(t));
                } else {
                    v.push(Box::new(s));
                }
            }
        }
    }
    v
}

fn set_linger0(fd: i32) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd owned by a live TcpStream; the option value is a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn idle(a: &Args) {
    use std::os::fd::AsRawFd;
    let count: usize = a.num("count", 5000);
    let conc: usize = a.num("concurrency", 50);
    let addr = a.req("addr").to_string();
    let sem = Arc::new(tokio::sync::Semaphore::new(conc));
    let start = Instant::now();
    let mut hs = Vec::with_capacity(count);
    for _ in 0..count {
        let sem = sem.clone();
        let addr = addr.clone();
        hs.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let mut s = TcpStream::connect(&addr).await?;
            s.set_nodelay(true)?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            if b[0] != b'x' {
                return Err(std::io::Error::other("bad echo"));
            }
            Ok::<_, std::io::Error>(s)
        }));
    }
    let mut held = Vec::with_capacity(count);
    for h in hs {
        match h.await.unwrap() {
            Ok(s) => held.push(s),
            Err(e) => die(&format!("idle connection {} failed: {e}", held.len())),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "HELD {{\"conns\": {}, \"elapsed\": {:.6}}}",
        held.len(),
        elapsed
    );
    std::io::stdout().flush().unwrap();
    if a.get("no-wait").is_none() {
        while stdin_line() {}
    }
    for s in &held {
        set_linger0(s.as_raw_fd());
    }
    drop(held);
}

/// The source addresses churn connections rotate through (see the module comment): none
/// unless the server is on 127.0.0.1 (a source in 127/8 only reaches a loopback server).
fn churn_sources(addr: std::net::SocketAddr) -> Vec<std::net::IpAddr> {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_loopback() => (2..=254u8)
            .map(|i| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i)))
            .collect(),
        _ => Vec::new(),
    }
}

/// One churn connection: connect (from `src`, if any), send `msg`, read the echo, close.
async fn churn_one(
    addr: std::net::SocketAddr,
    src: Option<std::net::IpAddr>,
    msg: &[u8],
    buf: &mut [u8],
    check: bool,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        // SAFETY: a valid fd owned by `sock`; the option value is a properly sized int.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(std::net::SocketAddr::new(ip, 0))?;
    }
    let mut s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(msg).await?;
    s.read_exact(buf).await?;
    if check && buf != msg {
        return Err(std::io::Error::other("churn echo mismatch"));
    }
    // A plain close: the echo has been read whole, so nothing unread makes it a RST.
    drop(s);
    Ok(())
}

async fn churn_worker(
    addr: std::net::SocketAddr,
    sources: Arc<Vec<std::net::IpAddr>>,
    first: usize,
    stride: usize,
    msg: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; msg.len()];
    let mut n: u64 = 0;
    let mut k = first;
    while !stop.load(Ordering::Relaxed) {
        let src = if sources.is_empty() {
            None
        } else {
            Some(sources[k % sources.len()])
        };
        k += stride;
        churn_one(addr, src, &msg, &mut buf, n.is_multiple_of(64))
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("{e} (from {src:?})")))?;
        n += 1;
    }
    Ok(n)
}

async fn run_churn(
    addr: std::net::SocketAddr,
    sources: &Arc<Vec<std::net::IpAddr>>,
    conns: usize,
    size: usize,
    dur: f64,
    offset: usize,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = self_cpu();
    let start = Instant::now();
    let hs: Vec<_> = (0..conns)
        .map(|i| {
            tokio::spawn(churn_worker(
                addr,
                sources.clone(),
                offset + i,
                conns,
                message(size, i),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(dur)).await;
    stop.store(true, Ordering::Relaxed);
    let mut requests = 0;
    for h in hs {
        match h.await.unwrap() {
            Ok(n) => requests += n,
            Err(e) => die(&format!("churn connection failed: {e}")),
        }
    }
    Phase {
        requests,
        lost: 0,
        elapsed: start.elapsed().as_secs_f64(),
        cpu: self_cpu() - cpu0,
    }
}

fn main() {
    raise_nofile();
    let a = Args::parse();
    let conns: usize = a.num("conns", 10);
    let size: usize = a.num("size", 1024);
    let warmup: f64 = a.num("warmup", 0.5);
    let duration: f64 = a.num("duration", 2.0);
    let wait = a.get("no-wait").is_none();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match a.mode.as_str() {
            "idle" => idle(&a).await,
            "churn" => {
                let addr: std::net::SocketAddr = a
                    .req("addr")
                    .parse()
                    .unwrap_or_else(|e| die(&format!("bad --addr: {e}")));
                let sources = Arc::new(churn_sources(addr));
                let w = run_churn(addr, &sources, conns, size, warmup, 0).await;
                say("WARM", &w, size);
                if wait && !stdin_line() {
                    return;
                }
                // The measured phase starts its rotation where the warm-up's ended.
                let m = run_churn(addr, &sources, conns, size, duration, w.requests as usize).await;
                say("RESULT", &m, size);
                if wait {
                    while stdin_line() {}
                }
            }
            "udp" => {
                let mut socks = Vec::new();
                for _ in 0..conns {
                    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                    s.connect(a.req("addr"))
                        .await
                        .unwrap_or_else(|e| die(&e.to_string()));
                    socks.push(s);
                }
                let (socks, w) = run_udp(socks, size, warmup).await;
                say("WARM", &w, size);
                if wait && !stdin_line() {
                    return;
                }
                let (_socks, m) = run_udp(socks, size, duration).await;
                say("RESULT", &m, size);
                if wait {
                    while stdin_line() {}
                }
            }
            "tcp" | "unix" | "tls" => {
                let flush = a.mode == "tls";
                let c = connect_all(&a, conns).await;
                let (c, w) = run_streams(c, size, warmup, flush).await;
                say("WARM", &w, size);
                if wait && !stdin_line() {
                    return;
                }
                let (_c, m) = run_streams(c, size, duration, flush).await;
                say("RESULT", &m, size);
                if wait {
                    while stdin_line() {}
                }
            }
            m => die(&format!("unknown mode {m}")),
        }
    });
}
