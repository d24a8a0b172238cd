//! Real nginx as the baseline proxy: started in the foreground with a generated config in a
//! temporary prefix (no system files touched), in front of one or more comfy-sim backends, with
//! nginx's own balancing (`round robin`, its default, or `least_conn`). Used by the overhead
//! bench (one upstream) and the scheduling bench (the fleet) when `nginx` is on PATH.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::proc::{find_on_path, free_port, signal};

/// nginx on PATH, if any.
pub fn find_nginx() -> Option<PathBuf> {
    find_on_path("nginx")
}

/// How nginx spreads requests over the upstreams.
#[derive(Clone, Copy, Debug)]
pub enum Balance {
    /// nginx's default: weighted round robin.
    RoundRobin,
    /// `least_conn`: the upstream with the fewest active connections.
    LeastConn,
}

/// nginx in the foreground; SIGTERM to its master on drop.
pub struct NginxProcess {
    child: Child,
    pub addr: SocketAddr,
    _prefix: tempfile::TempDir,
}

impl NginxProcess {
    pub async fn start(
        bin: &Path,
        upstreams: &[SocketAddr],
        balance: Balance,
    ) -> Result<NginxProcess, String> {
        let prefix = tempfile::Builder::new()
            .prefix("comfy-gate-bench-nginx-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let p = prefix.path().display().to_string();
        let port = free_port();
        let method = match balance {
            Balance::RoundRobin => "",
            Balance::LeastConn => "least_conn; ",
        };
        let servers: String = upstreams.iter().map(|u| format!("server {u}; ")).collect();
        let conf = format!(
            "daemon off;\n\
             worker_processes auto;\n\
             pid {p}/nginx.pid;\n\
             error_log {p}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {p}/client_body;\n\
               proxy_temp_path {p}/proxy;\n\
               fastcgi_temp_path {p}/fastcgi;\n\
               uwsgi_temp_path {p}/uwsgi;\n\
               scgi_temp_path {p}/scgi;\n\
               client_max_body_size 100m;\n\
               upstream comfy {{ {method}{servers}keepalive 64; keepalive_requests 1000000; }}\n\
               server {{\n\
                 listen 127.0.0.1:{port};\n\
                 keepalive_requests 1000000;\n\
                 location / {{\n\
                   proxy_pass http://comfy;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                   proxy_max_temp_file_size 0;\n\
                 }}\n\
               }}\n\
             }}\n"
        );
        let conf_path = prefix.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let mut child = Command::new(bin)
            .arg("-p")
            .arg(prefix.path())
            .arg("-e")
            .arg(prefix.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(prefix.path().join("error.log")).unwrap_or_default();
                return Err(format!("nginx exited with {status}: {}", log.trim()));
            }
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err("nginx did not listen within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(NginxProcess {
            child,
            addr,
            _prefix: prefix,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

impl Drop for NginxProcess {
    fn drop(&mut self) {
        // SIGTERM to the master by its pid: it stops its workers and exits; SIGKILL if it lingers.
        if let Some(pid) = self.child.id() {
            signal(pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.start_kill();
    }
}
