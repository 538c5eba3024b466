//! The delay and loss stage: a TUN device in the router namespace that every
//! forwarded packet passes through. A reader thread takes each IPv4 packet,
//! drops it with the direction's loss probability (a seeded generator, so a
//! run repeats), and queues it with the time it may leave; a writer thread
//! hands it back to the kernel at that time, which forwards it on. This is
//! the part of `netem` this kernel lacks, done at the packet level so that
//! both ends run real TCP over the delayed path (a byte-stream proxy would
//! end TCP at the proxy and hide the round trip from the sender).

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// Largest packet the stage carries (the TUN device's MTU is the veths' 1500).
const MAX_PACKET: usize = 65_536;
/// How often a waiting reader looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// What the stage does to each direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageSettings {
    /// The wire's rate towards the server: each packet occupies it for its
    /// bytes (with an Ethernet header) at this rate, so that even the first
    /// packet after a pause pays its serialisation, which a token bucket's
    /// burst would let through at once. Infinite: no serialisation.
    pub uplink_bits_per_s: f64,
    /// The wire's rate towards the client.
    pub downlink_bits_per_s: f64,
    /// One-way delay towards the server.
    pub uplink_delay: Duration,
    /// One-way delay towards the client.
    pub downlink_delay: Duration,
    /// Probability in [0, 1) that a packet towards the server is dropped.
    pub uplink_loss: f64,
    /// Probability in [0, 1) that a packet towards the client is dropped.
    pub downlink_loss: f64,
}

impl StageSettings {
    /// The same rate, delay (half the round trip) and loss both ways.
    pub fn symmetric(bits_per_s: f64, rtt: Duration, loss: f64) -> Self {
        Self {
            uplink_bits_per_s: bits_per_s,
            downlink_bits_per_s: bits_per_s,
            uplink_delay: rtt / 2,
            downlink_delay: rtt / 2,
            uplink_loss: loss,
            downlink_loss: loss,
        }
    }
}

/// Packets the stage has seen, per direction, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageCounts {
    pub uplink_forwarded: u64,
    pub uplink_dropped: u64,
    pub downlink_forwarded: u64,
    pub downlink_dropped: u64,
}

#[derive(Default)]
struct Counters {
    uplink_forwarded: AtomicU64,
    uplink_dropped: AtomicU64,
    downlink_forwarded: AtomicU64,
    downlink_dropped: AtomicU64,
}

/// Packets waiting for their time, one queue per direction (each in order,
/// as each direction's delay is the same for all its packets), and when
/// each direction's wire is next free.
#[derive(Default)]
struct Queues {
    uplink: VecDeque<(Instant, Vec<u8>)>,
    downlink: VecDeque<(Instant, Vec<u8>)>,
    uplink_free: Option<Instant>,
    downlink_free: Option<Instant>,
}

impl Queues {
    /// The direction whose head is due first, and when.
    fn next_due(&self) -> Option<(bool, Instant)> {
        match (self.uplink.front(), self.downlink.front()) {
            (Some((u, _)), Some((d, _))) => Some(if u <= d { (true, *u) } else { (false, *d) }),
            (Some((u, _)), None) => Some((true, *u)),
            (None, Some((d, _))) => Some((false, *d)),
            (None, None) => None,
        }
    }
}

struct Shared {
    settings: Mutex<(StageSettings, ChaCha8Rng)>,
    queues: Mutex<Queues>,
    ready: Condvar,
    stop: AtomicBool,
    counters: Counters,
}

/// A running stage; stopping it (drop) ends its threads and removes its device.
pub struct DelayStage {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl DelayStage {
    /// Creates the TUN device `device` inside the network namespace whose
    /// handle is at `netns` (e.g. `/run/netns/NAME`) and starts forwarding:
    /// packets to addresses in `server_net` go the uplink's way, all others
    /// the downlink's. The device is created down and without addresses;
    /// the caller brings it up and routes through it.
    pub fn start(netns: &std::path::Path, device: &str, server_net: (Ipv4Addr, u8)) -> Result<Self> {
        let shared = Arc::new(Shared {
            settings: Mutex::new((
                StageSettings::symmetric(f64::INFINITY, Duration::ZERO, 0.0),
                ChaCha8Rng::seed_from_u64(0),
            )),
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let (created_tx, created_rx) = std::sync::mpsc::channel();
        let netns = netns.to_path_buf();
        let name = device.to_string();
        let reader_shared = shared.clone();
        // The namespace is entered by the reader thread alone: a thread's
        // network namespace is its own, and the device lives where it was made.
        let reader = std::thread::Builder::new()
            .name("link-stage-read".into())
            .spawn(move || {
                let device = match enter(&netns).and_then(|()| open_device(&name)) {
                    Ok(device) => Arc::new(device),
                    Err(e) => {
                        let _ = created_tx.send(Err(e));
                        return;
                    }
                };
                let _ = created_tx.send(Ok(device.clone()));
                read_loop(&device, &reader_shared, server_net);
            })
            .map_err(Error::Io)?;
        let device = match created_rx.recv() {
            Ok(Ok(device)) => device,
            Ok(Err(e)) => {
                let _ = reader.join();
                return Err(e);
            }
            Err(_) => {
                return Err(Error::Stage(
                    "the stage's thread ended before creating its device".into(),
                ))
            }
        };
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("link-stage-write".into())
            .spawn(move || write_loop(&device, &writer_shared))
            .map_err(Error::Io)?;
        Ok(Self {
            shared,
            threads: vec![reader, writer],
        })
    }

    /// Applies `settings` to packets read from now on, with the loss
    /// generator reseeded from `seed`.
    pub fn configure(&self, settings: StageSettings, seed: u64) -> Result<()> {
        for loss in [settings.uplink_loss, settings.downlink_loss] {
            if !(0.0..1.0).contains(&loss) {
                return Err(Error::Stage(format!("loss {loss} is not a probability below 1")));
            }
        }
        for rate in [settings.uplink_bits_per_s, settings.downlink_bits_per_s] {
            if rate.is_nan() || rate < 8_000.0 {
                return Err(Error::Stage(format!("rate {rate} bit/s: at least 8 kbit/s")));
            }
        }
        *self.shared.settings.lock().expect("stage settings") = (settings, ChaCha8Rng::seed_from_u64(seed));
        Ok(())
    }

    /// Packets forwarded and dropped so far.
    pub fn counts(&self) -> StageCounts {
        let c = &self.shared.counters;
        StageCounts {
            uplink_forwarded: c.uplink_forwarded.load(Ordering::Relaxed),
            uplink_dropped: c.uplink_dropped.load(Ordering::Relaxed),
            downlink_forwarded: c.downlink_forwarded.load(Ordering::Relaxed),
            downlink_dropped: c.downlink_dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for DelayStage {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.ready.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Moves the calling thread into the network namespace at `netns`.
pub(crate) fn enter(netns: &std::path::Path) -> Result<()> {
    let file = std::fs::File::open(netns).map_err(|e| Error::Stage(format!("{}: {e}", netns.display())))?;
    // SAFETY: setns with a namespace file descriptor this thread holds open;
    // it changes the calling thread's network namespace only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(Error::Stage(format!(
            "cannot enter {}: {}",
            netns.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn open_device(name: &str) -> Result<tun::Device> {
    let mut config = tun::Configuration::default();
    config.tun_name(name).mtu(1500);
    config.platform_config(|p| {
        p.ensure_root_privileges(false);
    });
    tun::create(&config).map_err(|e| Error::Stage(format!("cannot create the TUN device {name}: {e}")))
}

/// When a packet of `len` IP bytes that arrived at `arrived` has left a
/// wire of `bits_per_s` that is free from `free`: it waits for the wire,
/// then occupies it for its bytes and an Ethernet header.
fn serialised(arrived: Instant, free: Option<Instant>, len: usize, bits_per_s: f64) -> Instant {
    let start = free.map_or(arrived, |f| f.max(arrived));
    if bits_per_s.is_finite() {
        start + Duration::from_secs_f64((len + 14) as f64 * 8.0 / bits_per_s)
    } else {
        start
    }
}

/// Whether an IPv4 packet is addressed into `net`.
fn towards(packet: &[u8], (net, prefix): (Ipv4Addr, u8)) -> bool {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return false;
    }
    let dst = u32::from_be_bytes([packet[16], packet[17], packet[18], packet[19]]);
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    dst & mask == u32::from(net) & mask
}

fn read_loop(device: &tun::Device, shared: &Shared, server_net: (Ipv4Addr, u8)) {
    let mut buf = vec![0u8; MAX_PACKET];
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match device.recv_timeout(&mut buf, POLL) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::Interrupted => {
                continue
            }
            Err(_) => break,
        };
        let arrived = Instant::now();
        let uplink = towards(&buf[..n], server_net);
        let (rate, delay, dropped) = {
            let mut guard = shared.settings.lock().expect("stage settings");
            let (settings, rng) = &mut *guard;
            let (rate, delay, loss) = if uplink {
                (settings.uplink_bits_per_s, settings.uplink_delay, settings.uplink_loss)
            } else {
                (
                    settings.downlink_bits_per_s,
                    settings.downlink_delay,
                    settings.downlink_loss,
                )
            };
            (rate, delay, loss > 0.0 && rng.gen::<f64>() < loss)
        };
        let c = &shared.counters;
        let counter = match (uplink, dropped) {
            (true, false) => &c.uplink_forwarded,
            (true, true) => &c.uplink_dropped,
            (false, false) => &c.downlink_forwarded,
            (false, true) => &c.downlink_dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if dropped {
            continue;
        }
        let mut queues = shared.queues.lock().expect("stage queues");
        let Queues {
            uplink: up,
            downlink: down,
            uplink_free,
            downlink_free,
        } = &mut *queues;
        let (queue, free) = if uplink {
            (up, uplink_free)
        } else {
            (down, downlink_free)
        };
        let sent = serialised(arrived, *free, n, rate);
        *free = Some(sent);
        queue.push_back((sent + delay, buf[..n].to_vec()));
        shared.ready.notify_one();
    }
}

fn write_loop(device: &tun::Device, shared: &Shared) {
    let mut queues = shared.queues.lock().expect("stage queues");
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Some((uplink, due)) = queues.next_due() else {
            queues = shared.ready.wait(queues).expect("stage queues");
            continue;
        };
        let now = Instant::now();
        if due > now {
            queues = shared.ready.wait_timeout(queues, due - now).expect("stage queues").0;
            continue;
        }
        let queue = if uplink {
            &mut queues.uplink
        } else {
            &mut queues.downlink
        };
        let (_, packet) = queue.pop_front().expect("a due packet");
        drop(queues);
        // A packet the kernel refuses (its route gone while stopping) is lost, as on a wire.
        let _ = device.send(&packet);
        queues = shared.queues.lock().expect("stage queues");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_to(dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn direction_follows_the_destination_network() {
        let server = (Ipv4Addr::new(10, 201, 2, 0), 24);
        assert!(towards(&ipv4_to([10, 201, 2, 2]), server));
        assert!(!towards(&ipv4_to([10, 201, 1, 2]), server));
        assert!(!towards(&ipv4_to([10, 201, 3, 2]), server));
        assert!(towards(&ipv4_to([10, 201, 3, 2]), (Ipv4Addr::new(10, 201, 0, 0), 16)));
        // Not IPv4, or cut short: towards the client.
        let mut v6 = ipv4_to([10, 201, 2, 2]);
        v6[0] = 0x60;
        assert!(!towards(&v6, server));
        assert!(!towards(&[0x45, 0, 0], server));
    }

    #[test]
    fn a_packet_waits_for_the_wire_then_occupies_it() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        // 986 + 14 bytes at 8 Mbit/s: 1 ms on the wire.
        assert_eq!(serialised(t, None, 986, 8e6), t + ms(1));
        assert_eq!(serialised(t, Some(t + ms(5)), 986, 8e6), t + ms(6));
        assert_eq!(serialised(t + ms(9), Some(t + ms(5)), 986, 8e6), t + ms(10));
        assert_eq!(serialised(t, Some(t + ms(5)), 986, f64::INFINITY), t + ms(5));
    }

    #[test]
    fn the_earliest_head_leaves_first() {
        let t = Instant::now();
        let mut q = Queues::default();
        assert_eq!(q.next_due(), None);
        q.uplink.push_back((t + Duration::from_millis(5), vec![]));
        q.downlink.push_back((t + Duration::from_millis(3), vec![]));
        assert_eq!(q.next_due(), Some((false, t + Duration::from_millis(3))));
        q.downlink.clear();
        assert_eq!(q.next_due(), Some((true, t + Duration::from_millis(5))));
    }
}
