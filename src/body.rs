//! Body types and helpers shared by the proxy and admin paths.
//!
//! (Named `body`, not `http`, so it does not shadow the `http` crate.)

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type every response (and every upstream request) uses.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Serialises a JSON value into a body.
pub fn json(value: &serde_json::Value) -> BoxBody {
    full(serde_json::to_vec(value).expect("a serde_json::Value always serialises"))
}

/// The upstream exchange ran past its deadline while the body streamed.
#[derive(Debug, thiserror::Error)]
#[error("the upstream response body did not finish before the deadline")]
pub struct BodyDeadlineExceeded;

pin_project! {
    /// A body that fails with [`BodyDeadlineExceeded`] if it has not ended
    /// by `deadline`, so a Knoq response that stalls mid-body cannot hold a
    /// client (and a pooled connection) forever. It also ends the body at a
    /// trailers frame: trailers could carry `Set-Cookie` past the header
    /// filter, and Knoq's JSON answers have no use for them.
    pub struct Deadline<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
    }
}

impl<B> Deadline<B> {
    pub fn new(inner: B, deadline: Instant) -> Self {
        Deadline {
            inner,
            sleep: tokio::time::sleep_until(deadline),
        }
    }
}

impl<B> Body for Deadline<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(match frame {
                Some(Ok(f)) if f.is_trailers() => None,
                other => other.map(|r| r.map_err(Into::into)),
            });
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyDeadlineExceeded.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What went wrong with a client's request body while it streamed to Knoq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// It grew past `server.max_body`.
    TooLarge,
    /// The client's stream failed (disconnect, bad chunk framing).
    Failed,
}

/// Shared record of a request body's fault. The upstream client reports a
/// failed request body only as a generic error (over HTTP/2 it becomes a
/// stream reset and the cause is gone), so the body itself records why.
#[derive(Debug, Clone, Default)]
pub struct BodyWatch(Arc<AtomicU8>);

impl BodyWatch {
    pub fn fault(&self) -> Option<BodyFault> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(BodyFault::TooLarge),
            2 => Some(BodyFault::Failed),
            _ => None,
        }
    }

    fn record(&self, fault: BodyFault) {
        let code = match fault {
            BodyFault::TooLarge => 1,
            BodyFault::Failed => 2,
        };
        self.0.store(code, Ordering::Release);
    }
}

/// The request body outgrew the configured limit.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the configured limit")]
pub struct BodyTooLarge;

pin_project! {
    /// A request body capped at `remaining` bytes that records in a
    /// [`BodyWatch`] why it failed, if it does.
    pub struct Capped<B> {
        #[pin]
        inner: B,
        remaining: u64,
        watch: BodyWatch,
    }
}

/// Caps a client's request body; the watch tells afterwards what failed.
pub fn capped<B>(inner: B, limit: u64) -> (BoxBody, BodyWatch)
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let watch = BodyWatch::default();
    let body = Capped {
        inner,
        remaining: limit,
        watch: watch.clone(),
    };
    (body.boxed_unsync(), watch)
}

impl<B> Body for Capped<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > *this.remaining {
                    this.watch.record(BodyFault::TooLarge);
                    return Poll::Ready(Some(Err(BodyTooLarge.into())));
                }
                *this.remaining -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.watch.record(BodyFault::Failed);
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A body that holds a guard until it is finished or dropped: used to
    /// count a request as in flight until its response has been sent.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Guarded<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Guarded {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body, G> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A body that never yields a frame, like a stalled upstream.
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_body_fails_when_the_inner_body_stalls() {
        let body = Deadline::new(Stalled, Instant::now() + Duration::from_secs(5));
        let err = body.collect().await.unwrap_err();
        assert!(err.is::<BodyDeadlineExceeded>());
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_body_passes_a_prompt_body_through() {
        let body = Deadline::new(
            Full::new(Bytes::from_static(b"{}")),
            Instant::now() + Duration::from_secs(5),
        );
        assert_eq!(body.collect().await.unwrap().to_bytes(), "{}");
    }

    #[tokio::test]
    async fn capped_body_passes_up_to_the_limit_and_records_overflow() {
        let (body, watch) = capped(Full::new(Bytes::from_static(b"12345")), 5);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "12345");
        assert_eq!(watch.fault(), None);
        let (body, watch) = capped(Full::new(Bytes::from_static(b"123456")), 5);
        assert!(body.collect().await.unwrap_err().is::<BodyTooLarge>());
        assert_eq!(watch.fault(), Some(BodyFault::TooLarge));
    }

    #[tokio::test]
    async fn guard_is_released_when_the_body_ends() {
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let body = Guarded::new(Full::new(Bytes::from_static(b"x")), tx);
        assert!(rx.try_recv().is_err(), "held while unread");
        let _ = body.collect().await;
        assert!(rx.await.is_err(), "sender dropped at end of body");
    }
}
