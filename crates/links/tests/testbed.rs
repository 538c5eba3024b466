//! The test bed against the kernel: the round trip the stage adds, the rate
//! the qdisc sets, and the loss the stage draws, measured with TCP between
//! the client's and the server's namespaces. Needs root, iproute2 and
//! /dev/net/tun; without them it prints why and checks nothing, as
//! `frankensplit bench links` says why and exits 0 (whose test checks that
//! note). CI runs as root, where it runs in full.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use frankensplit_links::{unavailable, LinkSettings, Testbed, SERVER_ADDR};

fn bed_or_skip(name: &str) -> Option<Testbed> {
    if let Some(reason) = unavailable() {
        eprintln!("NOT RUN: {reason}");
        return None;
    }
    Some(Testbed::create(&format!("fslt{}-{name}", std::process::id() % 100_000)).expect("the bed is made"))
}

/// A server in its namespace that reads `expect` bytes per connection and
/// answers one byte, for `connections` connections.
fn sink(bed: &Testbed, port: u16, expect: usize, connections: usize) -> std::thread::JoinHandle<()> {
    let listener = bed
        .as_server(move || TcpListener::bind(SocketAddr::from((SERVER_ADDR, port))))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for _ in 0..connections {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; expect];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(&[1]).unwrap();
        }
    })
}

/// Connects from the client's namespace; the connect time and the time to send `bytes` and read the answer.
fn transfer(bed: &Testbed, port: u16, bytes: usize) -> (Duration, Duration) {
    bed.as_client(move || {
        let start = Instant::now();
        let mut stream = TcpStream::connect(SocketAddr::from((SERVER_ADDR, port))).unwrap();
        let connected = start.elapsed();
        let start = Instant::now();
        stream.write_all(&vec![7u8; bytes]).unwrap();
        let mut one = [0u8];
        stream.read_exact(&mut one).unwrap();
        (connected, start.elapsed())
    })
    .unwrap()
}

#[test]
fn the_bed_delays_shapes_and_drops_as_configured() {
    let Some(bed) = bed_or_skip("a") else { return };
    let rtt = Duration::from_millis(40);
    let rate = 1e6;
    bed.configure(
        &LinkSettings {
            uplink_bits_per_s: rate,
            downlink_bits_per_s: rate,
            rtt,
            loss: 0.0,
        },
        1,
    )
    .unwrap();
    let bytes = 250_000;
    let server = sink(&bed, 9000, bytes, 1);
    let (connect, send) = transfer(&bed, 9000, bytes);
    server.join().unwrap();
    eprintln!("connect {connect:?}, {bytes} B in {send:?}");
    // A handshake is one round trip, plus the stage's timer grain.
    assert!(
        connect >= rtt && connect < rtt + Duration::from_millis(10),
        "{connect:?}"
    );
    // The kernel shapes the transfer: at least the payload's bits at the
    // rate, and not much more than that plus the round trips of slow start.
    let floor = Duration::from_secs_f64(bytes as f64 * 8.0 / rate);
    assert!(send >= floor, "{send:?} < {floor:?}");
    assert!(send < floor.mul_f64(1.25) + rtt * 4, "{send:?}");

    let counts = bed.stage_counts();
    assert!(
        counts.uplink_forwarded > 150 && counts.downlink_forwarded > 20,
        "{counts:?}"
    );
    assert_eq!(counts.uplink_dropped + counts.downlink_dropped, 0);

    // At 5 % loss about one packet in twenty is dropped, and TCP still delivers.
    bed.configure(
        &LinkSettings {
            uplink_bits_per_s: 10e6,
            downlink_bits_per_s: 10e6,
            rtt: Duration::from_millis(10),
            loss: 0.05,
        },
        2,
    )
    .unwrap();
    let before = bed.stage_counts();
    let server = sink(&bed, 9001, bytes, 1);
    transfer(&bed, 9001, bytes);
    server.join().unwrap();
    let after = bed.stage_counts();
    let seen = (after.uplink_forwarded + after.uplink_dropped) - (before.uplink_forwarded + before.uplink_dropped);
    let dropped = after.uplink_dropped - before.uplink_dropped;
    let share = dropped as f64 / seen as f64;
    eprintln!("dropped {dropped} of {seen} uplink packets");
    assert!((0.02..0.09).contains(&share), "{share}");
}
