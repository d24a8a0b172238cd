//! Rate limits and caps of `[limits]` (and each user's overrides), applied before a request does
//! anything: requests per second by route class, prompts per minute with a burst, upload bytes
//! per second, WebSocket connections per client address. Over a limit: 429 with `Retry-After`
//! (`GateError::RateLimited`), and nothing of the request is applied. The caps that need the
//! prompt table (prompts waiting, prompts running, GPU-seconds per day, the gate queue's global
//! cap) are the scheduler's, checked under its lock as the prompt is admitted.
//!
//! Why governor: its GCRA is the standard, lock-free and exact about when the next request
//! conforms (which is what `Retry-After` must say); hand-written buckets get the edges wrong.
//! One keyed limiter per (class, quota): every anonymous client address and every user with
//! the default limits shares the limiter of that quota, keyed by tenant (`user:NAME` or
//! `ip:ADDR`); a user with overrides gets the limiter of their quota. Keys idle for longer than
//! their bucket takes to refill are dropped now and then (`retain_recent`), so the state stays
//! bounded by the clients of the last minute.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::Auth;
use crate::error::GateError;
use crate::sched::tenant::Caller;

/// The classes of routes that have buckets of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// `POST /prompt`.
    Submit,
    /// `/view`, `/upload/image`, `/upload/mask`.
    Files,
    /// Everything else: reads (queue, history, jobs, object info, the web frontend) and the
    /// control posts (interrupt, queue and history deletes).
    Read,
}

impl Class {
    /// The class of a request (`path` after `/api` is stripped).
    pub fn of(method: &http::Method, path: &str) -> Self {
        match (method, path) {
            (&http::Method::POST, "/prompt") => Class::Submit,
            (_, "/view" | "/upload/image" | "/upload/mask") => Class::Files,
            _ => Class::Read,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Class::Submit => "requests_per_second (submit)",
            Class::Files => "requests_per_second (files)",
            Class::Read => "requests_per_second (read)",
        }
    }
}

/// What a bucket counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Bucket {
    Requests(Class),
    Prompts,
    UploadBytes,
}

/// How long a client is told to wait when the per-address socket cap is reached (a socket
/// frees when a client leaves, which the gate cannot predict), in seconds.
pub const WS_RETRY: Duration = Duration::from_secs(5);

/// Checks between two sweeps of idle keys.
const SWEEP_EVERY: u64 = 4096;

type Keyed = DefaultKeyedRateLimiter<String>;

/// The limiter state of the gate.
#[derive(Default)]
pub struct Limiter {
    /// (what, cells per period in ns, burst) → its keyed limiter.
    buckets: Mutex<HashMap<(Bucket, u64, u32), Arc<Keyed>>>,
    /// Client address → WebSocket connections open (shared with their [`SocketSlot`]s).
    sockets: Arc<Mutex<HashMap<IpAddr, u32>>>,
    checks: AtomicU64,
}

impl Limiter {
    /// One request of `class` from `caller`: `Err(RateLimited)` over `requests_per_second`.
    pub fn check_request(
        &self,
        auth: &Auth,
        caller: &Caller,
        class: Class,
    ) -> Result<(), GateError> {
        let rate = caller.limits(auth).requests_per_second;
        let Some(per_second) = NonZeroU32::new(rate) else {
            return Ok(());
        };
        let quota = Quota::per_second(per_second);
        self.take(Bucket::Requests(class), quota, caller, 1, class.name())
    }

    /// One prompt from `caller`: `Err(RateLimited)` over `prompts_per_minute` (with
    /// `prompt_burst` at once, 1 if unset).
    pub fn check_prompt(&self, auth: &Auth, caller: &Caller) -> Result<(), GateError> {
        let l = caller.limits(auth);
        let Some(per_minute) = NonZeroU32::new(l.prompts_per_minute) else {
            return Ok(());
        };
        let burst = NonZeroU32::new(l.prompt_burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        self.take(Bucket::Prompts, quota, caller, 1, "prompts_per_minute")
    }

    /// An upload of `bytes` from `caller`: `Err(RateLimited)` over `upload_bytes_per_second`.
    /// The burst is one second's worth or one whole body of `max_body` bytes, whichever is
    /// larger, so any body the gate takes can pass.
    pub fn check_upload(
        &self,
        auth: &Auth,
        caller: &Caller,
        bytes: usize,
        max_body: u64,
    ) -> Result<(), GateError> {
        let rate = caller.limits(auth).upload_bytes_per_second;
        let Some(per_second) = NonZeroU32::new(clamp_u32(rate)) else {
            return Ok(());
        };
        let burst = NonZeroU32::new(clamp_u32(rate.max(max_body))).unwrap_or(per_second);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        let n = clamp_u32(bytes as u64).max(1);
        self.take(
            Bucket::UploadBytes,
            quota,
            caller,
            n,
            "upload_bytes_per_second",
        )
    }

    /// A WebSocket from `client`: a slot of `ws_per_ip`, held until the [`SocketSlot`] drops;
    /// `Err(RateLimited)` when that many are open from it.
    pub fn open_socket(&self, auth: &Auth, client: IpAddr) -> Result<SocketSlot, GateError> {
        let cap = auth.ws_per_ip;
        let mut open = lock(&self.sockets);
        let n = open.entry(client).or_default();
        if cap > 0 && *n >= cap {
            return Err(GateError::RateLimited {
                limit: "ws_per_ip",
                retry_after: WS_RETRY,
            });
        }
        *n += 1;
        Ok(SocketSlot {
            sockets: self.sockets.clone(),
            client,
        })
    }

    /// Sockets open per client address (for tests and `/admin/records`).
    pub fn sockets_open(&self, client: IpAddr) -> u32 {
        lock(&self.sockets).get(&client).copied().unwrap_or(0)
    }

    /// Takes `n` cells of `bucket` under `quota` for `caller`'s tenant.
    fn take(
        &self,
        bucket: Bucket,
        quota: Quota,
        caller: &Caller,
        n: u32,
        limit: &'static str,
    ) -> Result<(), GateError> {
        let limiter = {
            let key = (
                bucket,
                quota.replenish_interval().as_nanos() as u64,
                quota.burst_size().get(),
            );
            lock(&self.buckets)
                .entry(key)
                .or_insert_with(|| Arc::new(Keyed::keyed(quota)))
                .clone()
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            for l in lock(&self.buckets).values() {
                l.retain_recent();
            }
        }
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let refused = match limiter.check_key_n(&caller.tenant_key(), n) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(not_until)) => not_until.wait_time_from(limiter.clock().now()),
            // More cells than the burst: never conforms; a minute is as honest as any wait.
            Err(_) => Duration::from_secs(60),
        };
        Err(GateError::RateLimited {
            limit,
            retry_after: refused,
        })
    }
}

/// One open WebSocket counted against its client address's `ws_per_ip`; released on drop.
pub struct SocketSlot {
    sockets: Arc<Mutex<HashMap<IpAddr, u32>>>,
    client: IpAddr,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.sockets);
        if let Some(n) = open.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Limits, User};

    fn auth(limits: Limits, ws_per_ip: u32) -> Auth {
        Auth {
            limits,
            ws_per_ip,
            ..Auth::default()
        }
    }

    fn anon(ip: &str) -> Caller {
        let ip: IpAddr = ip.parse().unwrap();
        Caller::anonymous(format!("ip:{ip}"), ip)
    }

    #[test]
    fn prompts_per_minute_with_a_burst() {
        let a = auth(
            Limits {
                prompts_per_minute: 10,
                prompt_burst: 2,
                ..Limits::default()
            },
            0,
        );
        let l = Limiter::default();
        let c = anon("10.0.0.1");
        assert!(l.check_prompt(&a, &c).is_ok());
        assert!(l.check_prompt(&a, &c).is_ok());
        match l.check_prompt(&a, &c) {
            Err(GateError::RateLimited { limit, retry_after }) => {
                assert_eq!(limit, "prompts_per_minute");
                // One prompt every 6 s.
                assert!(
                    retry_after > Duration::from_secs(5) && retry_after <= Duration::from_secs(6),
                    "{retry_after:?}"
                );
            }
            other => panic!("expected a 429, got {other:?}"),
        }
        // Another address has its own bucket.
        assert!(l.check_prompt(&a, &anon("10.0.0.2")).is_ok());
    }

    #[test]
    fn zero_is_off() {
        let a = auth(Limits::default(), 0);
        let l = Limiter::default();
        let c = anon("10.0.0.1");
        for _ in 0..1000 {
            l.check_prompt(&a, &c).unwrap();
            l.check_request(&a, &c, Class::Read).unwrap();
            l.check_upload(&a, &c, 1 << 20, 1 << 20).unwrap();
        }
        let slots: Vec<_> = (0..100)
            .map(|_| l.open_socket(&a, c.client).unwrap())
            .collect();
        assert_eq!(l.sockets_open(c.client), 100);
        drop(slots);
        assert_eq!(l.sockets_open(c.client), 0);
    }

    #[test]
    fn a_users_override_is_their_own_bucket() {
        let a = auth(
            Limits {
                requests_per_second: 1,
                ..Limits::default()
            },
            0,
        );
        let vip = Arc::new(User {
            name: "vip".into(),
            token_sha256: [0; 32],
            band: 0,
            weight: 1.0,
            admin: false,
            limits: Limits {
                requests_per_second: 100,
                ..Limits::default()
            },
        });
        let l = Limiter::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let c = Caller::user(vip, ip);
        for _ in 0..50 {
            l.check_request(&a, &c, Class::Read).unwrap();
        }
        let anon = anon("10.0.0.1");
        l.check_request(&a, &anon, Class::Read).unwrap();
        assert!(l.check_request(&a, &anon, Class::Read).is_err());
        // Classes are separate buckets.
        l.check_request(&a, &anon, Class::Submit).unwrap();
    }

    #[test]
    fn sockets_per_address() {
        let a = auth(Limits::default(), 2);
        let l = Limiter::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let one = l.open_socket(&a, ip).unwrap();
        let _two = l.open_socket(&a, ip).unwrap();
        assert!(matches!(
            l.open_socket(&a, ip),
            Err(GateError::RateLimited {
                limit: "ws_per_ip",
                ..
            })
        ));
        l.open_socket(&a, "10.0.0.2".parse().unwrap()).unwrap();
        drop(one);
        l.open_socket(&a, ip).unwrap();
    }

    #[test]
    fn upload_bytes_take_their_size() {
        let a = auth(
            Limits {
                upload_bytes_per_second: 1000,
                ..Limits::default()
            },
            0,
        );
        let l = Limiter::default();
        let c = anon("10.0.0.1");
        // The burst is one whole body (5000 bytes here).
        l.check_upload(&a, &c, 5000, 5000).unwrap();
        let Err(GateError::RateLimited { retry_after, .. }) = l.check_upload(&a, &c, 2000, 5000)
        else {
            panic!("expected a 429");
        };
        assert!(retry_after > Duration::from_millis(1500), "{retry_after:?}");
    }
}
