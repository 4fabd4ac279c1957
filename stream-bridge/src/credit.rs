//! The credit applications grant the bridge's links, read off the frames they send.
//!
//! fe2o3-amqp keeps a link's flow state to itself, so [`FlowTap`] reads a connection's
//! incoming bytes as they pass to it (it never changes them): the application's `attach`
//! frames tell which handle names which link, its `flow` frames carry the receiver's
//! delivery-count and link-credit. The sender may transfer up to delivery-count +
//! link-credit deliveries in all (AMQP 1.0 §2.6.7); the bridge counts those it made on each
//! link (from its initial delivery-count, 0), and the difference is the credit left,
//! exported per link as `ferrule_bridge_link_credit` when `/metrics` is read.
//!
//! The frame reader is a pure function of the bytes ([`FrameReader::push`]), tested with raw
//! frames. A stream it cannot read (not AMQP framing) makes it stop looking; the connection
//! itself is fe2o3's to judge.

use fe2o3_amqp::types::definitions::Role;
use fe2o3_amqp::types::performatives::{Attach, Detach, Flow};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Frames longer than this are skipped unread: flow, attach and detach frames are far
/// shorter; only transfers with large payloads come near it.
const MAX_READ_FRAME: usize = 64 * 1024;

/// What a frame of the application's said about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkFrame {
    /// The application attached a receiving link `name` as `handle` on `channel`.
    Attached {
        channel: u16,
        handle: u32,
        name: String,
    },
    /// The receiving link's flow state: it may take deliveries up to `limit`
    /// (delivery-count + link-credit).
    Flow {
        channel: u16,
        handle: u32,
        limit: u32,
    },
    /// The application detached `handle` on `channel`.
    Detached { channel: u16, handle: u32 },
}

/// Reads AMQP frames out of a byte stream handed over in arbitrary pieces.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    /// The frame (or 8-byte protocol header) being gathered.
    pending: Vec<u8>,
    /// Bytes of a frame being skipped unread.
    skip: usize,
    /// Not AMQP framing: nothing more is read.
    lost: bool,
}

impl FrameReader {
    /// Reads `bytes`, the next part of the stream, and returns what its complete frames said
    /// about links.
    pub(crate) fn push(&mut self, mut bytes: &[u8], out: &mut Vec<LinkFrame>) {
        while !bytes.is_empty() && !self.lost {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            // The 8 bytes of a frame header, or of a protocol header ("AMQP" + id + version).
            if self.pending.len() < 8 {
                let n = (8 - self.pending.len()).min(bytes.len());
                self.pending.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if self.pending.len() < 8 {
                    return;
                }
                if self.pending.starts_with(b"AMQP") {
                    self.pending.clear();
                    continue;
                }
            }
            let size = u32::from_be_bytes([
                self.pending[0],
                self.pending[1],
                self.pending[2],
                self.pending[3],
            ]) as usize;
            let doff = usize::from(self.pending[4]) * 4;
            if size < 8 || doff < 8 || doff > size {
                self.lost = true;
                return;
            }
            // Only AMQP frames (type 0) of a readable size are gathered.
            if self.pending.len() == 8 && (self.pending[5] != 0 || size > MAX_READ_FRAME) {
                self.pending.clear();
                self.skip = size - 8;
                continue;
            }
            let n = (size - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.pending.len() < size {
                return;
            }
            let channel = u16::from_be_bytes([self.pending[6], self.pending[7]]);
            if let Some(frame) = link_frame(channel, &self.pending[doff..]) {
                out.push(frame);
            }
            self.pending.clear();
        }
    }
}

/// The link news of one AMQP frame body (a performative, maybe a payload after it).
fn link_frame(channel: u16, body: &[u8]) -> Option<LinkFrame> {
    // A described list: 0x00, then the descriptor as smallulong (0x53 code) or ulong.
    let code = match body {
        [0x00, 0x53, code, ..] => u64::from(*code),
        [0x00, 0x80, rest @ ..] if rest.len() >= 8 => {
            u64::from_be_bytes(rest[..8].try_into().ok()?)
        }
        _ => return None,
    };
    match code {
        0x12 => {
            let attach: Attach = serde_amqp::from_slice(body).ok()?;
            (attach.role == Role::Receiver).then_some(LinkFrame::Attached {
                channel,
                handle: attach.handle.0,
                name: attach.name,
            })
        }
        0x13 => {
            let flow: Flow = serde_amqp::from_slice(body).ok()?;
            Some(LinkFrame::Flow {
                channel,
                handle: flow.handle?.0,
                limit: flow.delivery_count?.wrapping_add(flow.link_credit?),
            })
        }
        0x16 => {
            let detach: Detach = serde_amqp::from_slice(body).ok()?;
            Some(LinkFrame::Detached {
                channel,
                handle: detach.handle.0,
            })
        }
        _ => None,
    }
}

/// One link's credit: the limit the application's last flow set, and what the bridge sent.
#[derive(Debug)]
pub(crate) struct LinkCredit {
    tenant: String,
    kind: &'static str,
    name: String,
    limit: AtomicU32,
    sent: AtomicU32,
    /// Events sent on the link and not settled yet.
    unsettled: AtomicU32,
}

impl LinkCredit {
    /// The link's unsettled deliveries now.
    pub(crate) fn set_unsettled(&self, n: usize) {
        self.unsettled
            .store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    /// A delivery was transferred.
    pub(crate) fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Deliveries the application would still take (0 when it has granted none).
    pub(crate) fn left(&self) -> u32 {
        let left = self
            .limit
            .load(Ordering::Relaxed)
            .wrapping_sub(self.sent.load(Ordering::Relaxed));
        // Serial-number arithmetic: "below" the count sent means none left.
        if left > u32::MAX / 2 { 0 } else { left }
    }
}

/// The links of one connection, by name, and which handle of the application names which.
#[derive(Debug, Default)]
pub(crate) struct Credits {
    state: Mutex<CreditState>,
}

#[derive(Debug, Default)]
struct CreditState {
    /// The flow limits of links the application named; the link's own task takes it over.
    limits: HashMap<String, u32>,
    handles: HashMap<(u16, u32), String>,
    /// Held by the links' tasks: a link's series goes with its task, whether or not the
    /// application detached it (a dropped connection sends no detach).
    links: HashMap<String, Weak<LinkCredit>>,
}

impl Credits {
    /// The credit of the sending link `name` the bridge feeds from `tenant`'s `kind` topic,
    /// exported until the returned handle is dropped.
    pub(crate) fn link(&self, name: &str, tenant: &str, kind: &'static str) -> Arc<LinkCredit> {
        let mut state = self.state();
        let limit = state.limits.get(name).copied().unwrap_or(0);
        let link = Arc::new(LinkCredit {
            tenant: tenant.to_owned(),
            kind,
            name: name.to_owned(),
            limit: AtomicU32::new(limit),
            sent: AtomicU32::new(0),
            unsettled: AtomicU32::new(0),
        });
        state.links.retain(|_, l| l.strong_count() > 0);
        state.links.insert(name.to_owned(), Arc::downgrade(&link));
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&link));
        link
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CreditState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, frames: &[LinkFrame]) {
        let mut state = self.state();
        for frame in frames {
            match frame {
                LinkFrame::Attached {
                    channel,
                    handle,
                    name,
                } => {
                    state.handles.insert((*channel, *handle), name.clone());
                }
                LinkFrame::Flow {
                    channel,
                    handle,
                    limit,
                } => {
                    let Some(name) = state.handles.get(&(*channel, *handle)).cloned() else {
                        continue;
                    };
                    if let Some(link) = state.links.get(&name).and_then(Weak::upgrade) {
                        link.limit.store(*limit, Ordering::Relaxed);
                    }
                    state.limits.insert(name, *limit);
                }
                LinkFrame::Detached { channel, handle } => {
                    if let Some(name) = state.handles.remove(&(*channel, *handle)) {
                        state.limits.remove(&name);
                        state.links.remove(&name);
                    }
                }
            }
        }
    }
}

/// Links whose credit is exported: those still held by their task.
static LIVE: LazyLock<Mutex<Vec<Weak<LinkCredit>>>> = LazyLock::new(|| {
    let desc = |name: &str, help: &str| {
        Desc::new(
            name.into(),
            help.into(),
            vec!["tenant".into(), "type".into(), "link".into()],
            HashMap::new(),
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}"))
    };
    let collector = CreditCollector {
        credit: desc(
            "ferrule_bridge_link_credit",
            "Deliveries an application's receiving link would still take: the credit its last \
             flow granted less what the bridge sent since",
        ),
        unsettled: desc(
            "ferrule_bridge_link_unsettled_deliveries",
            "Events sent on an application's receiving link and not settled yet",
        ),
    };
    // A second registration (several bridges in one test process) keeps the first.
    let _ = prometheus::register(Box::new(collector));
    Mutex::default()
});

/// Builds the per-link gauges from the live links when `/metrics` is read.
struct CreditCollector {
    credit: Desc,
    unsettled: Desc,
}

impl Collector for CreditCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.credit, &self.unsettled]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let family = |desc: &Desc, value: fn(&LinkCredit) -> u32| {
            let mut family = MetricFamily::default();
            family.set_name(desc.fq_name.clone());
            family.set_help(desc.help.clone());
            family.set_field_type(MetricType::GAUGE);
            family.set_metric(Self::metrics(value));
            family
        };
        vec![
            family(&self.credit, LinkCredit::left),
            family(&self.unsettled, |l| l.unsettled.load(Ordering::Relaxed)),
        ]
    }
}

impl CreditCollector {
    /// One gauge per live link, of `value`.
    fn metrics(value: fn(&LinkCredit) -> u32) -> Vec<Metric> {
        let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|l| l.strong_count() > 0);
        let label = |name: &str, value: &str| {
            let mut l = LabelPair::default();
            l.set_name(name.to_owned());
            l.set_value(value.to_owned());
            l
        };
        live.iter()
            .filter_map(Weak::upgrade)
            .map(|link| {
                let mut gauge = Gauge::default();
                gauge.set_value(f64::from(value(&link)));
                let mut m = Metric::from_gauge(gauge);
                m.set_label(vec![
                    label("tenant", &link.tenant),
                    label("type", link.kind),
                    label("link", &link.name),
                ]);
                m
            })
            .collect()
    }
}

/// A connection's stream, its incoming bytes read by a [`FrameReader`] on the way.
pub(crate) struct FlowTap<S> {
    inner: S,
    reader: FrameReader,
    frames: Vec<LinkFrame>,
    credits: Arc<Credits>,
}

impl<S> std::fmt::Debug for FlowTap<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTap").finish_non_exhaustive()
    }
}

impl<S> FlowTap<S> {
    pub(crate) fn new(inner: S, credits: Arc<Credits>) -> Self {
        FlowTap {
            inner,
            reader: FrameReader::default(),
            frames: Vec::new(),
            credits,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FlowTap<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            this.reader.push(&buf.filled()[before..], &mut this.frames);
            if !this.frames.is_empty() {
                this.credits.apply(&this.frames);
                this.frames.clear();
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FlowTap<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::definitions::{Handle, ReceiverSettleMode, SenderSettleMode};
    use fe2o3_amqp::types::performatives::Performative;

    /// An AMQP frame (type 0) on `channel` with `performative` and `payload` after it.
    fn frame(channel: u16, performative: Performative, payload: &[u8]) -> Vec<u8> {
        let body = serde_amqp::to_vec(&performative).unwrap();
        let size = (8 + body.len() + payload.len()) as u32;
        let mut f = size.to_be_bytes().to_vec();
        f.extend_from_slice(&[2, 0]);
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&body);
        f.extend_from_slice(payload);
        f
    }

    fn attach(handle: u32, name: &str, role: Role) -> Performative {
        Performative::Attach(Attach {
            name: name.into(),
            handle: Handle(handle),
            role,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: None,
            target: None,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    fn flow(handle: u32, delivery_count: u32, link_credit: u32) -> Performative {
        Performative::Flow(Flow {
            next_incoming_id: Some(0),
            incoming_window: 2048,
            next_outgoing_id: 0,
            outgoing_window: 2048,
            handle: Some(Handle(handle)),
            delivery_count: Some(delivery_count),
            link_credit: Some(link_credit),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        })
    }

    /// The bytes of an application's connection: the protocol headers, a SASL frame, then
    /// frames about links.
    fn stream() -> Vec<u8> {
        let mut s = b"AMQP\x03\x01\x00\x00".to_vec();
        // A SASL frame (type 1) of 12 bytes: skipped.
        s.extend_from_slice(&[0, 0, 0, 12, 2, 1, 0, 0, 0xde, 0xad, 0xbe, 0xef]);
        s.extend_from_slice(b"AMQP\x00\x01\x00\x00");
        s.extend(frame(3, attach(7, "app-link", Role::Receiver), &[]));
        // A sending link of the application's (commands) is not the bridge's to feed.
        s.extend(frame(3, attach(8, "commands", Role::Sender), &[]));
        s.extend(frame(3, flow(7, 0, 10), &[]));
        // A frame with bytes after its performative, and a large frame skipped unread.
        let end = Performative::End(fe2o3_amqp::types::performatives::End { error: None });
        s.extend(frame(3, end, &[1u8; 300]));
        let mut large = ((MAX_READ_FRAME + 100) as u32).to_be_bytes().to_vec();
        large.extend_from_slice(&[2, 0, 0, 3]);
        large.extend(vec![0u8; MAX_READ_FRAME + 92]);
        s.extend(large);
        s.extend(frame(3, flow(7, 4, 6), &[]));
        s.extend(frame(
            3,
            Performative::Detach(Detach {
                handle: Handle(7),
                closed: true,
                error: None,
            }),
            &[],
        ));
        s
    }

    fn expected() -> Vec<LinkFrame> {
        vec![
            LinkFrame::Attached {
                channel: 3,
                handle: 7,
                name: "app-link".into(),
            },
            LinkFrame::Flow {
                channel: 3,
                handle: 7,
                limit: 10,
            },
            LinkFrame::Flow {
                channel: 3,
                handle: 7,
                limit: 10,
            },
            LinkFrame::Detached {
                channel: 3,
                handle: 7,
            },
        ]
    }

    #[test]
    fn link_frames_are_read_in_one_piece_and_byte_by_byte() {
        let bytes = stream();
        let mut out = Vec::new();
        FrameReader::default().push(&bytes, &mut out);
        assert_eq!(out, expected());
        let mut reader = FrameReader::default();
        let mut out = Vec::new();
        for b in &bytes {
            reader.push(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(out, expected());
    }

    #[test]
    fn what_is_not_amqp_framing_stops_the_reader() {
        let mut reader = FrameReader::default();
        let mut out = Vec::new();
        reader.push(&[0, 0, 0, 4, 2, 0, 0, 0], &mut out);
        assert!(reader.lost);
        reader.push(&stream(), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn credit_left_is_the_last_limit_less_what_was_sent() {
        let credits = Credits::default();
        let attached = LinkFrame::Attached {
            channel: 0,
            handle: 1,
            name: "l".into(),
        };
        let flow = |limit| LinkFrame::Flow {
            channel: 0,
            handle: 1,
            limit,
        };
        // The application's flow may come before the link's task registered it.
        credits.apply(&[attached, flow(5)]);
        let link = credits.link("l", "t", "event");
        assert_eq!(link.left(), 5);
        for _ in 0..5 {
            link.sent();
        }
        assert_eq!(link.left(), 0);
        credits.apply(&[flow(8)]);
        assert_eq!(link.left(), 3);
        // Wrapping sequence numbers.
        link.limit.store(2, Ordering::Relaxed);
        link.sent.store(u32::MAX - 1, Ordering::Relaxed);
        assert_eq!(link.left(), 4);
        link.limit.store(u32::MAX - 3, Ordering::Relaxed);
        assert_eq!(link.left(), 0);
        credits.apply(&[LinkFrame::Detached {
            channel: 0,
            handle: 1,
        }]);
        assert!(credits.state().links.is_empty());
    }

    #[test]
    fn a_links_credit_is_exported_while_its_task_holds_it() {
        let credits = Credits::default();
        let name = format!("link-{}", uuid::Uuid::new_v4().simple());
        let exported = || {
            CreditCollector::metrics(LinkCredit::left)
                .iter()
                .any(|m| m.get_label().iter().any(|l| l.value() == name))
        };
        let link = credits.link(&name, "t", "telemetry");
        assert!(exported());
        // No detach came (the connection dropped): the series goes with the task's handle.
        drop(link);
        assert!(!exported());
    }
}
