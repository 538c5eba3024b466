//! The link model: how long one HTTP request with a body of `bytes` takes
//! on a link of given rates and round trip, counting what a byte-rate
//! formula leaves out and the emulated links show (docs/latency.md): the
//! request head and the answer, each segment's TCP/IP and link-layer
//! headers, the handshake of a fresh connection, and the round trips TCP's
//! slow start waits for before its window covers the link.

use serde::Serialize;

/// TCP payload per segment on a 1500-byte MTU with timestamps (1500 − 20 − 32).
pub const MSS: f64 = 1448.0;
/// Bytes each segment adds on the wire: IPv4 (20), TCP with timestamps
/// (32) and the Ethernet header the shaper counts (14).
pub const SEGMENT_OVERHEAD: f64 = 66.0;
/// A SYN or SYN-ACK on the wire: IPv4 (20), TCP with its options (40), Ethernet (14).
pub const SYN_BYTES: f64 = 74.0;
/// A bare acknowledgement on the wire.
pub const ACK_BYTES: f64 = 66.0;
/// Linux's initial congestion window, in segments (RFC 6928).
pub const INITIAL_WINDOW: f64 = 10.0;

/// A link and how the client uses it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkModel {
    /// Client → server rate, bits per second.
    pub uplink_bits_per_s: f64,
    /// Server → client rate, bits per second.
    pub downlink_bits_per_s: f64,
    /// Round-trip time, milliseconds.
    pub rtt_ms: f64,
    /// A new TCP connection per request (handshake and slow start each
    /// time) rather than one kept alive.
    pub fresh_connection: bool,
    /// Bytes of the request line and headers.
    pub request_head_bytes: f64,
    /// Bytes of the answer, head and body.
    pub answer_bytes: f64,
}

/// The parts of one request's network time, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NetworkTime {
    /// Handshake of a fresh connection (one round trip, the SYN and
    /// SYN-ACK on the wire and the ACK ahead of the request), else 0.
    pub handshake_ms: f64,
    /// The request's and the answer's propagation (one round trip).
    pub rtt_ms: f64,
    /// The request's bytes on the wire at the uplink rate.
    pub upload_ms: f64,
    /// Time the sender waits for acknowledgements while slow start's
    /// window is smaller than the link holds.
    pub slow_start_ms: f64,
    /// The answer's bytes on the wire at the downlink rate.
    pub download_ms: f64,
    /// The sum.
    pub total_ms: f64,
}

/// Bytes on the wire for `payload` bytes of TCP data.
pub fn wire_bytes(payload: f64) -> f64 {
    payload + (payload / MSS).ceil().max(1.0) * SEGMENT_OVERHEAD
}

impl LinkModel {
    /// The network time of a request whose body is `body_bytes`.
    pub fn request(&self, body_bytes: f64) -> NetworkTime {
        let request = body_bytes + self.request_head_bytes;
        let upload_ms = wire_bytes(request) * 8.0 / self.uplink_bits_per_s * 1e3;
        let download_ms = wire_bytes(self.answer_bytes) * 8.0 / self.downlink_bits_per_s * 1e3;
        let handshake_ms = if self.fresh_connection {
            self.rtt_ms
                + ((SYN_BYTES + ACK_BYTES) / self.uplink_bits_per_s + SYN_BYTES / self.downlink_bits_per_s) * 8e3
        } else {
            0.0
        };
        let slow_start_ms = if self.fresh_connection {
            self.slow_start_stalls_ms(request)
        } else {
            0.0
        };
        NetworkTime {
            handshake_ms,
            rtt_ms: self.rtt_ms,
            upload_ms,
            slow_start_ms,
            download_ms,
            total_ms: handshake_ms + self.rtt_ms + upload_ms + slow_start_ms + download_ms,
        }
    }

    /// Slow start from the initial window, the window doubling every round
    /// trip: after each window the sender idles for what is left of the
    /// round trip once the window is on the wire, until the data is out or
    /// the window covers the round trip (Kurose and Ross's latency model).
    fn slow_start_stalls_ms(&self, bytes: f64) -> f64 {
        let segment_ms = (MSS + SEGMENT_OVERHEAD) * 8.0 / self.uplink_bits_per_s * 1e3;
        let mut left = (bytes / MSS).ceil();
        let mut window = INITIAL_WINDOW;
        let mut stalls = 0.0;
        while left > window {
            let sending_ms = window * segment_ms;
            if sending_ms >= self.rtt_ms {
                break;
            }
            stalls += self.rtt_ms - sending_ms;
            left -= window;
            window *= 2.0;
        }
        stalls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(fresh: bool) -> LinkModel {
        LinkModel {
            uplink_bits_per_s: 10e6,
            downlink_bits_per_s: 10e6,
            rtt_ms: 50.0,
            fresh_connection: fresh,
            request_head_bytes: 0.0,
            answer_bytes: 0.0,
        }
    }

    #[test]
    fn a_kept_connection_pays_one_round_trip_and_the_bytes() {
        let t = link(false).request(14_480.0);
        assert_eq!(t.handshake_ms + t.slow_start_ms, 0.0);
        // 10 full segments: 10 · 1514 B at 10 Mbit/s.
        assert!((t.upload_ms - 10.0 * 1514.0 * 8.0 / 1e4).abs() < 1e-9);
        assert!((t.total_ms - (50.0 + t.upload_ms + t.download_ms)).abs() < 1e-9);
    }

    #[test]
    fn slow_start_waits_while_the_window_is_smaller_than_the_link() {
        let fresh = link(true);
        // Within the initial window: no stall, one extra round trip for the handshake.
        let small = fresh.request(10.0 * MSS);
        assert_eq!(small.slow_start_ms, 0.0);
        // SYN and ACK up, SYN-ACK down: 214 B at 10 Mbit/s = 0.1712 ms.
        assert!((small.handshake_ms - 50.1712).abs() < 1e-9);
        // 30 segments: windows of 10 and 20; one stall after the first
        // window (10 segments take 12.1 ms of a 50 ms round trip).
        let segment_ms = 1514.0 * 8.0 / 1e4;
        let stalls = fresh.request(30.0 * MSS).slow_start_ms;
        assert!((stalls - (50.0 - 10.0 * segment_ms)).abs() < 1e-9, "{stalls}");
        // On a slow link the first window already fills the round trip.
        let slow = LinkModel {
            uplink_bits_per_s: 270e3,
            ..fresh
        };
        assert_eq!(slow.request(100.0 * MSS).slow_start_ms, 0.0);
    }

    #[test]
    fn every_segment_carries_its_headers() {
        assert_eq!(wire_bytes(1.0), 67.0);
        assert_eq!(wire_bytes(MSS), MSS + 66.0);
        assert_eq!(wire_bytes(MSS + 1.0), MSS + 1.0 + 132.0);
    }
}
