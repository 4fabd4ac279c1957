//! A connection's publishes that wait for the broker, answered in the order they arrived
//! (MQTT sends PUBACKs in PUBLISH order). Only the oldest is polled; the rest wait in a plain
//! queue, so a publish costs no task or boxed future of its own and a connection is woken
//! once per answer it can give, not once per broker ack.

use crate::commands::PendingResponse;
use crate::pipeline::{Accepted, Pending, Refusal};
use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

/// What one publish waits for.
pub(super) enum Waiting {
    Upload(Pending),
    /// A command response; the device is answered as for the accepted upload.
    Response(PendingResponse, Accepted),
}

/// Publishes in arrival order, each with what the adapter needs to answer it (`C`).
pub(super) struct AckQueue<C> {
    queue: VecDeque<(C, Waiting)>,
}

impl<C> AckQueue<C> {
    pub(super) fn new() -> Self {
        AckQueue {
            queue: VecDeque::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(super) fn push(&mut self, context: C, waiting: Waiting) {
        self.queue.push_back((context, waiting));
    }

    /// The oldest publish, once the broker answered it.
    pub(super) async fn next(&mut self) -> (C, Result<Accepted, Refusal>) {
        std::future::poll_fn(|cx| self.poll_oldest(cx)).await
    }

    /// The oldest publish if the broker has answered it already.
    pub(super) fn next_now(&mut self) -> Option<(C, Result<Accepted, Refusal>)> {
        match self.poll_oldest(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(done) => Some(done),
            Poll::Pending => None,
        }
    }

    fn poll_oldest(&mut self, cx: &mut Context<'_>) -> Poll<(C, Result<Accepted, Refusal>)> {
        let result = match self.queue.front_mut() {
            None => return Poll::Pending,
            Some((_, Waiting::Upload(p))) => std::task::ready!(p.poll_outcome(cx)),
            Some((_, Waiting::Response(p, accepted))) => {
                std::task::ready!(p.poll_acked(cx)).map(|()| std::mem::take(accepted))
            }
        };
        match self.queue.pop_front() {
            Some((context, _)) => Poll::Ready((context, result)),
            None => Poll::Pending,
        }
    }
}
