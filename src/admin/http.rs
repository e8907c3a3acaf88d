//! A minimal HTTP/1.1 endpoint at `admin.metrics_addr`: `GET /metrics`
//! (Prometheus text format), `GET /healthz` (the process serves) and
//! `GET /readyz` (503 while no primary is reachable).

use crate::app::App;
use crate::stats::{CLIENT_ACTIVE, CLIENT_WAITING, SERVER_ACTIVE};
use prometheus::Encoder;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves until shutdown.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let mut shutdown = app.shutdown_signal();
    // This endpoint shares the control thread with the lag monitor: a
    // flood of connections is turned away rather than served slowly.
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN));
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let Ok(permit) = open.clone().try_acquire_owned() else { continue };
                    let app = app.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), handle(app, stream)).await;
                        drop(permit);
                    });
                }
                // Out of descriptors and the like: no hot loop.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Connections served at once; more are closed at accept.
const MAX_OPEN: usize = 64;

async fn handle(app: Arc<App>, mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        // Only the new bytes (and the three before them) can end the head.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if buf[from..].windows(4).any(|w| w == b"\r\n\r\n") || buf.len() >= 16 * 1024 {
            break;
        }
    }
    let request = String::from_utf8_lossy(&buf);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    let (status, ctype, body) = match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", render(&app)),
        "/healthz" => ("200 OK", "text/plain", b"ok\n".to_vec()),
        "/readyz" => {
            // The monitor's view when one runs (there are replicas);
            // else a connect to the primary.
            let monitored = !app.topology().replicas.is_empty() && app.monitor_spec().is_some();
            let ready = if monitored { app.topology().snapshot().primary_reachable } else { primary_answers(&app).await };
            if ready {
                ("200 OK", "text/plain", b"ready\n".to_vec())
            } else {
                ("503 Service Unavailable", "text/plain", b"no primary reachable\n".to_vec())
            }
        }
        _ => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
    };
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// Without a monitor: a TCP connect to the primary, at most one a second
/// (each one makes the postmaster fork a backend), the answer reused in
/// between.
async fn primary_answers(app: &App) -> bool {
    type Probe = Option<(String, std::time::Instant, bool)>;
    static LAST: std::sync::Mutex<Probe> = std::sync::Mutex::new(None);
    let addr = app.config().cluster.primary.clone();
    if let Some((a, at, ok)) = &*LAST.lock().unwrap_or_else(|e| e.into_inner()) {
        if *a == addr && at.elapsed() < Duration::from_secs(1) {
            return *ok;
        }
    }
    let ok = matches!(tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&addr)).await, Ok(Ok(_)));
    *LAST.lock().unwrap_or_else(|e| e.into_inner()) = Some((addr, std::time::Instant::now(), ok));
    ok
}

/// Refreshes the state gauges, then encodes every metric.
fn render(app: &App) -> Vec<u8> {
    // One scrape at a time: gauges are reset and rebuilt below, and a
    // scrape gathering in between would miss series.
    static RENDERING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = RENDERING.lock().unwrap_or_else(|e| e.into_inner());
    let m = &app.metrics;
    let (mut active, mut waiting, mut idle) = (0, 0, 0);
    for c in app.conns.clients.lock().unwrap().values() {
        match c.state.load(Ordering::Relaxed) {
            CLIENT_ACTIVE => active += 1,
            CLIENT_WAITING => waiting += 1,
            _ => idle += 1,
        }
    }
    m.clients.with_label_values(&["active"]).set(active);
    m.clients.with_label_values(&["waiting"]).set(waiting);
    m.clients.with_label_values(&["idle"]).set(idle);
    m.pinned_clients.set(app.pinned_clients.load(Ordering::Relaxed) as i64);
    m.servers.reset();
    for p in app.pools() {
        let st = p.stats();
        let k = &p.key;
        let active = app.conns.servers.lock().unwrap().values().filter(|i| i.database == k.database && i.user == k.user && i.backend == k.backend && i.state.load(Ordering::Relaxed) == SERVER_ACTIVE).count();
        m.servers.with_label_values(&[&k.database, &k.user, &k.backend, "active"]).set(active as i64);
        m.servers.with_label_values(&[&k.database, &k.user, &k.backend, "idle"]).set(st.idle as i64);
        m.servers.with_label_values(&[&k.database, &k.user, &k.backend, "opening"]).set(st.total.saturating_sub(st.idle + active) as i64);
    }
    let topo = app.topology();
    let snap = topo.snapshot();
    m.replica_lag_bytes.reset();
    m.replica_lag_seconds.reset();
    m.replica_usable.reset();
    for r in &snap.replicas {
        m.replica_lag_bytes.with_label_values(&[&r.name]).set(r.lag_bytes as i64);
        m.replica_lag_seconds.with_label_values(&[&r.name]).set(r.lag.as_secs_f64());
        for (g, ok) in &r.groups {
            m.replica_usable.with_label_values(&[&r.name, &topo.groups[*g].name]).set(i64::from(*ok));
        }
    }
    let mut out = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&m.registry.gather(), &mut out);
    out
}
