//! A DNS server for tests: answers A queries for one name with addresses the test may change
//! while it runs (a headless Service whose pods come and go), no records for other types of
//! that name, and NXDOMAIN for every other name. It serves UDP sockets the test bound where
//! the programs under test look for the system's name server (`/etc/resolv.conf`).

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u16 = 3;
const RCODE_FORMERR: u16 = 1;
/// Short, so that answers changed by the test are not cached for long anywhere.
const TTL_SECS: u32 = 1;

pub struct DnsServer {
    name: String,
    records: Arc<Mutex<Vec<Ipv4Addr>>>,
    queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Answers `name` (without a trailing dot) with `addresses`.
    pub fn new(name: &str, addresses: Vec<Ipv4Addr>) -> DnsServer {
        DnsServer {
            name: name.trim_end_matches('.').to_ascii_lowercase(),
            records: Arc::new(Mutex::new(addresses)),
            queries: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        }
    }

    /// Serves queries arriving on `socket` until dropped.
    pub fn serve(&mut self, socket: UdpSocket) -> Result<()> {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .context("set the DNS socket's read timeout")?;
        let (name, records, queries, stop) = (
            self.name.clone(),
            self.records.clone(),
            self.queries.clone(),
            self.stop.clone(),
        );
        self.threads.push(std::thread::spawn(move || {
            let mut buffer = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                queries.fetch_add(1, Ordering::Relaxed);
                let addresses = records.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(reply) = answer(&buffer[..len], &name, &addresses) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        }));
        Ok(())
    }

    /// From now on `name` resolves to `addresses`.
    pub fn set(&self, addresses: Vec<Ipv4Addr>) {
        *self.records.lock().unwrap_or_else(|e| e.into_inner()) = addresses;
    }

    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The first IPv4 name server of `/etc/resolv.conf`, or the resolver's default (127.0.0.1)
/// when it names none.
pub fn system_nameserver() -> Result<Ipv4Addr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let first = conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .map(str::trim)
        .next();
    match first {
        None => Ok(Ipv4Addr::LOCALHOST),
        Some(text) => text
            .parse()
            .with_context(|| format!("the first name server, {text}, is not IPv4")),
    }
}

/// The reply to `query`: `None` for what is not a DNS query at all.
fn answer(query: &[u8], name: &str, addresses: &[Ipv4Addr]) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    let flags = u16::from_be_bytes([header[2], header[3]]);
    if flags & 0x8000 != 0 {
        return None; // a response, not a query
    }
    let question = parse_question(query);
    let mut reply = Vec::with_capacity(512);
    reply.extend_from_slice(&header[..2]); // id
                                           // QR, the query's opcode and RD, RA.
    let mut flags = 0x8000 | (flags & 0x7900) | 0x0080;
    let Some((qname, qtype, end)) = question else {
        flags |= RCODE_FORMERR;
        reply.extend_from_slice(&flags.to_be_bytes());
        reply.extend_from_slice(&[0; 8]);
        return Some(reply);
    };
    let ours = qname.eq_ignore_ascii_case(name);
    if !ours {
        flags |= RCODE_NXDOMAIN;
    }
    let answers: &[Ipv4Addr] = if ours && qtype == TYPE_A {
        addresses
    } else {
        &[]
    };
    reply.extend_from_slice(&flags.to_be_bytes());
    reply.extend_from_slice(&1u16.to_be_bytes()); // one question
    reply.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0; 4]); // no authority or additional records
    reply.extend_from_slice(&query[12..end]);
    for address in answers {
        reply.extend_from_slice(&[0xc0, 12]); // the name, by pointer to the question
        reply.extend_from_slice(&TYPE_A.to_be_bytes());
        reply.extend_from_slice(&CLASS_IN.to_be_bytes());
        reply.extend_from_slice(&TTL_SECS.to_be_bytes());
        reply.extend_from_slice(&4u16.to_be_bytes());
        reply.extend_from_slice(&address.octets());
    }
    Some(reply)
}

/// The first question's name (dotted, no trailing dot), type, and where it ends.
fn parse_question(query: &[u8]) -> Option<(String, u16, usize)> {
    let count = u16::from_be_bytes([*query.get(4)?, *query.get(5)?]);
    if count != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression has no place in a question
        }
        labels.push(
            std::str::from_utf8(query.get(at..at + len)?)
                .ok()?
                .to_owned(),
        );
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    query.get(at + 2..at + 4)?;
    Some((labels.join("."), qtype, at + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    #[test]
    fn a_queries_for_the_name_get_every_address_and_others_get_nxdomain() {
        let addresses = [Ipv4Addr::new(10, 77, 0, 11), Ipv4Addr::new(10, 77, 0, 12)];
        let reply = answer(&query(7, "Peers.test", TYPE_A), "peers.test", &addresses).unwrap();
        assert_eq!(&reply[..2], &7u16.to_be_bytes());
        assert_eq!(reply[3] & 0x0f, 0, "rcode");
        assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 2, "answers");
        assert_eq!(&reply[reply.len() - 4..], &[10, 77, 0, 12]);

        let aaaa = answer(&query(8, "peers.test", 28), "peers.test", &addresses).unwrap();
        assert_eq!((aaaa[3] & 0x0f, aaaa[7]), (0, 0));
        let other = answer(&query(9, "other.test", TYPE_A), "peers.test", &addresses).unwrap();
        assert_eq!(other[3] & 0x0f, RCODE_NXDOMAIN as u8);
        assert!(answer(&[0; 5], "peers.test", &addresses).is_none());
        let broken = answer(
            &query(1, "peers.test", TYPE_A)[..14],
            "peers.test",
            &addresses,
        );
        assert_eq!(broken.unwrap()[3] & 0x0f, RCODE_FORMERR as u8);
    }
}
