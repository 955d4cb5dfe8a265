//! Admission at the HTTP upgrade, before any work is done for a connection: the allowed
//! origins (`--allowed-origins`, refused with 403) and the connections per client address
//! (`--max-connections-per-ip`, refused with 429), next to the gateway-wide connection limit
//! (503). Decisions about the session key are not made here: PROTOCOL.md 3.2 wants them
//! answered after the upgrade (`unauthorized`), which the client does not retry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

/// Which browser origins may connect.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// Empty: every origin.
    allowed: Vec<String>,
}

impl Origins {
    /// From `--allowed-origins` (e.g. `https://app.example.com`; `*` or nothing allows all).
    pub fn new(allowed: &[String]) -> Self {
        let allowed = allowed
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect::<Vec<_>>();
        if allowed.iter().any(|o| o == "*") {
            return Self::default();
        }
        Self { allowed }
    }

    /// Whether a request with this `Origin` header may upgrade. Requests without one are not
    /// from a browser page (browsers always send it on WebSocket upgrades); the check protects
    /// against other sites' pages, not against programs, which can send any origin.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        if self.allowed.is_empty() {
            return true;
        }
        let Some(origin) = origin else { return true };
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        self.allowed.contains(&origin)
    }
}

/// Open connections per client address (the TCP peer: behind a proxy, the proxy's).
#[derive(Debug)]
pub struct PerIp {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    /// `max` 0: no limit.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place for one more connection from `ip`; `Err(())` when it has `max` already.
    /// `Ok(None)` without a limit (nothing is counted then).
    #[allow(clippy::result_unit_err)]
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Option<Box<IpPlace>>, ()> {
        if self.max == 0 {
            return Ok(None);
        }
        let mut counts = self.lock();
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return Err(());
        }
        *count += 1;
        Ok(Some(Box::new(IpPlace {
            limiter: self.clone(),
            ip,
        })))
    }

    /// Open connections from `ip` (tests).
    pub fn count(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip).copied().unwrap_or(0)
    }
}

/// One connection's place under its address's limit; given back on drop.
#[derive(Debug)]
pub struct IpPlace {
    limiter: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpPlace {
    fn drop(&mut self) {
        let mut counts = self.limiter.lock();
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// A connection's places under the gateway's limits, held until its socket is gone. The
/// per-address place is boxed and absent without that limit, so an idle connection pays one
/// word for it.
#[derive(Debug)]
pub struct Slot {
    pub permit: OwnedSemaphorePermit,
    pub ip: Option<Box<IpPlace>>,
}
