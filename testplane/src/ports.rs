//! Loopback ports for the servers a plane starts, chosen below the kernel's ephemeral range.
//!
//! A port found by binding port 0 and releasing it comes from the ephemeral range, the range
//! the kernel also takes the local port of every outgoing connection from (etcd dialling its
//! own gRPC port, a test's clients, another test's plane). Such a connection can take the port
//! between its release and the server's bind, and the server fails with "address already in
//! use"; the same can happen while a killed server is restarted on its port. No outgoing
//! connection takes a port below the range, so only another listener can, and each candidate
//! is checked by binding it.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out.
const FLOOR: u32 = 10_000;

/// The start of the ephemeral range (Linux: `net.ipv4.ip_local_port_range`; 32768 where it
/// cannot be read), kept at least 1,000 ports above [`FLOOR`].
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
        .max(FLOOR + 1_000)
}

/// Where this process starts looking: spread by process id, so that test binaries running at
/// the same time try different ports first; each pick moves on.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A loopback port nobody listens on, below the ephemeral range (the port-0 way only when none
/// is free there).
pub fn free_port() -> std::io::Result<u16> {
    let span = ephemeral_start() - FLOOR;
    let seed = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span.min(2_000) {
        let offset = (seed + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(FLOOR + offset) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len());
        let start = ephemeral_start();
        assert!(
            ports
                .iter()
                .all(|p| u32::from(*p) >= FLOOR && u32::from(*p) < start)
        );
    }
}
