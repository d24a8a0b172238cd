//! The HTTP load generator: closed loop, keep-alive HTTP/1.1 connections, latency per request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub struct HttpCase {
    pub name: String,
    pub path: String,
    /// A response body shorter than this counts as an error.
    pub expect_min_bytes: usize,
}

/// Completed requests in the measurement window, and their latencies.
#[derive(Clone, Debug, Default)]
pub struct LoadStats {
    pub latencies_ms: Vec<f64>,
    pub window: Duration,
    pub errors: u64,
}

impl LoadStats {
    pub fn rps(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.window.as_secs_f64()
    }
    pub fn p50_ms(&self) -> f64 {
        percentile(&self.latencies_ms, 50.0)
    }
    pub fn p99_ms(&self) -> f64 {
        percentile(&self.latencies_ms, 99.0)
    }
}

/// Nearest-rank percentile of unsorted values (NaN when empty).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn fmt_ms(ms: f64) -> String {
    if ms.is_nan() {
        "–".to_string()
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// A closed loop of `conns` keep-alive HTTP/1.1 connections, each sending `GET path` as soon as
/// its previous answer is read in full; requests completed in the `measure` window after
/// `warmup` count.
pub async fn http_load(
    addr: SocketAddr,
    path: &str,
    expect_min_bytes: usize,
    conns: usize,
    warmup: Duration,
    measure: Duration,
) -> LoadStats {
    let start = Instant::now();
    let from = start + warmup;
    let until = from + measure;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            connection_loop(addr, &path, expect_min_bytes, from, until).await
        }));
    }
    let mut stats = LoadStats {
        window: measure,
        ..Default::default()
    };
    for t in tasks {
        let (lat, errors) = t.await.expect("load task");
        stats.latencies_ms.extend(lat);
        stats.errors += errors;
    }
    stats
}

async fn connection_loop(
    addr: SocketAddr,
    path: &str,
    expect_min_bytes: usize,
    from: Instant,
    until: Instant,
) -> (Vec<f64>, u64) {
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let host = addr.to_string();
    'reconnect: while Instant::now() < until {
        let Ok(stream) = TcpStream::connect(addr).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            errors += 1;
            continue;
        };
        tokio::spawn(conn);
        loop {
            let sent = Instant::now();
            if sent >= until {
                break 'reconnect;
            }
            if sender.ready().await.is_err() {
                // The server closed the connection after a complete answer (`Connection:
                // close`, a keep-alive limit): reconnect, not an error.
                continue 'reconnect;
            }
            let req = hyper::Request::get(path)
                .header(hyper::header::HOST, &host)
                .body(Empty::<Bytes>::new())
                .expect("request");
            let Ok(resp) = sender.send_request(req).await else {
                errors += 1;
                continue 'reconnect;
            };
            let ok_status = resp.status().is_success();
            let mut body = resp.into_body();
            let mut n = 0usize;
            let mut body_ok = true;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.len();
                        }
                    }
                    Err(_) => {
                        body_ok = false;
                        break;
                    }
                }
            }
            let done = Instant::now();
            if !ok_status || !body_ok || n < expect_min_bytes {
                errors += 1;
                if !body_ok {
                    continue 'reconnect;
                }
                continue;
            }
            if sent >= from && done <= until {
                latencies.push(done.duration_since(sent).as_secs_f64() * 1e3);
            }
        }
    }
    (latencies, errors)
}
