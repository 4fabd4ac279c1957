//! Simulated CoAP devices (plain UDP, CON or NON), and the CoAP ceiling: a bare coap-lite
//! server in this process that answers 2.04 without Kafka.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;

/// A server that decodes each request and answers 2.04 (piggybacked for CON, a NON for NON),
/// from one receiving task per core on a shared socket, so that it can use every core the
/// box gives it, as Ferrule does.
pub async fn bare_server() -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let addr = socket.local_addr()?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mid = Arc::new(std::sync::atomic::AtomicU16::new(0));
    let task = tokio::spawn(async move {
        // The workers end with this task (aborted by the caller): dropping the set aborts them.
        let mut serving = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (socket, mid) = (socket.clone(), mid.clone());
            serving.spawn(async move {
                let mut buf = vec![0u8; 65_535];
                loop {
                    let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                        continue;
                    };
                    let Ok(request) = Packet::from_bytes(&buf[..n]) else {
                        continue;
                    };
                    let mut response = Packet::new();
                    if request.header.get_type() == MessageType::Confirmable {
                        response.header.set_type(MessageType::Acknowledgement);
                        response.header.message_id = request.header.message_id;
                    } else {
                        response.header.set_type(MessageType::NonConfirmable);
                        response.header.message_id = mid.fetch_add(1, Ordering::Relaxed);
                    }
                    response.header.code = MessageClass::Response(ResponseType::Changed);
                    response.set_token(request.get_token().to_vec());
                    if let Ok(bytes) = response.to_bytes() {
                        let _ = socket.send_to(&bytes, peer).await;
                    }
                }
            });
        }
        while serving.join_next().await.is_some() {}
    });
    Ok((addr, task))
}

/// `requests` PUTs of `size` bytes to `paths` (taken in turn), `concurrency` devices each
/// with its own socket and one request in flight; a request unanswered for 2 s is sent again,
/// at most 4 times: a CON with the same message id (a retransmission), a NON as a new message
/// (a server ignores a repeated NON).
pub async fn put_load(
    addr: SocketAddr,
    paths: Vec<String>,
    requests: usize,
    concurrency: usize,
    confirmable: bool,
    size: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let paths = Arc::new(paths);
    let payload = vec![b'x'; size];
    let workers = (0..concurrency).map(|_| {
        let (next, paths, payload) = (next.clone(), paths.clone(), payload.clone());
        tokio::spawn(async move {
            let socket = UdpSocket::bind("127.0.0.1:0").await?;
            socket.connect(addr).await?;
            let mut buf = vec![0u8; 2048];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return anyhow::Ok(());
                }
                let mut p = Packet::new();
                p.header.set_type(if confirmable {
                    MessageType::Confirmable
                } else {
                    MessageType::NonConfirmable
                });
                p.header.code = MessageClass::Request(RequestType::Put);
                p.header.message_id = i as u16;
                let token = (i as u32).to_be_bytes().to_vec();
                p.set_token(token.clone());
                for seg in paths[i % paths.len()].trim_start_matches('/').split('/') {
                    p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
                }
                // application/octet-stream
                p.add_option(CoapOption::ContentFormat, vec![42]);
                p.payload = payload.clone();
                let mut answered = false;
                'attempts: for attempt in 0..5u16 {
                    if !confirmable {
                        p.header.message_id = (i as u16).wrapping_add(attempt.wrapping_mul(13_107));
                    }
                    socket.send(&p.to_bytes_unlimited()?).await?;
                    let wait = tokio::time::sleep(Duration::from_secs(2));
                    tokio::pin!(wait);
                    loop {
                        tokio::select! {
                            n = socket.recv(&mut buf) => {
                                let Ok(r) = Packet::from_bytes(&buf[..n?]) else { continue };
                                // A late answer to an earlier request is not this one's.
                                if r.get_token() != token.as_slice() {
                                    continue;
                                }
                                anyhow::ensure!(
                                    r.header.code == MessageClass::Response(ResponseType::Changed),
                                    "CoAP {}",
                                    r.header.get_code()
                                );
                                answered = true;
                                break 'attempts;
                            }
                            _ = &mut wait => continue 'attempts,
                        }
                    }
                }
                anyhow::ensure!(answered, "no answer to request {i} after 5 attempts");
            }
        })
    });
    for r in futures_util::future::join_all(workers).await {
        r??;
    }
    Ok(())
}

/// The `Location-Path` of a gateway's answer when it carries a command to answer (it starts
/// with `command_response`); `None` for an answer without a command.
pub fn command_location(answer: &Packet) -> Option<Vec<String>> {
    let location: Vec<String> = answer
        .get_option(CoapOption::LocationPath)
        .into_iter()
        .flatten()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    (location.first().map(String::as_str) == Some("command_response")).then_some(location)
}

/// The empty ACK a device sends for a separate response (a CON) with message id `mid`.
pub fn empty_ack(mid: u16) -> Packet {
    let mut ack = Packet::new();
    ack.header.set_type(MessageType::Acknowledgement);
    ack.header.code = MessageClass::Empty;
    ack.header.message_id = mid;
    ack
}
